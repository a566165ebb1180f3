"""``launch.initialize_for``: a job's config names its layout once (``runtime.LoadArgs`` and the
configs built on it); the launcher reads the fields the config has and keeps the defaults of the
ones it lacks. (Every tool test runs the real initialisation through it.)"""

from types import SimpleNamespace

from megatron_slm import launch
from megatron_slm.scoring import ScoreConfig
from megatron_slm.tinylm.compact_config import RemapConfig


def test_the_layout_comes_from_the_config(monkeypatch):
    monkeypatch.setattr(launch, "initialize", lambda **kw: kw)
    score = ScoreConfig(load="ckpt", data_prefix=["d"], device="cpu", seed=7,
                        tensor_model_parallel_size=2, pipeline_model_parallel_size=3)  # fmt: skip
    assert launch.initialize_for(score) == {
        "device": "cpu",
        "tensor_model_parallel_size": 2,
        "pipeline_model_parallel_size": 3,
        "seed": 7,
    }
    remap = RemapConfig(load="ckpt", id_map="m.json", save="out", pipeline_model_parallel_size=2)
    assert launch.initialize_for(remap) == {  # no seed field: initialize's default stays
        "device": "auto",
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 2,
    }
    assert launch.initialize_for(SimpleNamespace(device="cuda"), device="cpu") == {"device": "cpu"}


def _groups(rank, world, order):
    import torch.distributed as dist
    from megatron.core import parallel_state

    launch.initialize(device="cpu", pipeline_model_parallel_size=2, order=order)
    ranks = dist.get_process_group_ranks
    return (
        ranks(parallel_state.get_pipeline_model_parallel_group()),
        ranks(parallel_state.get_data_parallel_group()),
        launch.rank_order(),
    )


def test_tp_pp_dp_order_puts_a_replicas_stages_side_by_side():
    """--use-tp-pp-dp-mapping's order: with PP 2 and DP 2 over 4 ranks, a replica's stages are
    ranks (0, 1) and (2, 3); megatron-core's default makes them (0, 2) and (1, 3)."""
    from tests.dist_helpers import run_distributed

    default = run_distributed(_groups, 4, launch.DEFAULT_RANK_ORDER)
    mapped = run_distributed(_groups, 4, launch.TP_PP_DP_ORDER)
    assert [g[0] for g in default] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [g[1] for g in default] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [g[0] for g in mapped] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [g[1] for g in mapped] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert {g[2] for g in mapped} == {launch.TP_PP_DP_ORDER}


def _gloo_side_groups(rank, world, gloo_groups):
    from megatron.core import parallel_state

    launch.initialize(device="cpu", gloo_groups=gloo_groups)
    try:
        return parallel_state.get_data_parallel_group_gloo().size()
    except AssertionError as e:  # (megatron-core's "not initialized")
        return str(e)


def test_gloo_side_groups_only_when_asked():
    """--disable-gloo-process-groups: megatron-core's gloo data-parallel group is not made."""
    from tests.dist_helpers import run_distributed

    assert run_distributed(_gloo_side_groups, 2, True) == [2, 2]
    assert (
        run_distributed(_gloo_side_groups, 2, False)
        == ["data parallel group-gloo is not initialized"] * 2
    )
