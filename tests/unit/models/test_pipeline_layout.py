"""--pipeline-model-parallel-layout: megatron-core's parse, refused in one line naming the flag
where megatron-core would refuse it (or where the MTP heads would not be built here)."""

import pytest

from megatron_slm.errors import ConfigError
from megatron_slm.models import get_preset
from megatron_slm.models.pipeline_layout import (
    canonical_layout,
    layout_virtual_size,
    parse_pipeline_layout,
)
from megatron_slm.models.presets import check_parallel_layout
from megatron_slm.training.config import parse_config

BASE = ["--data-path", "A", "--tokenizer-type", "NullTokenizer", "--vocab-size", "511",
        "--train-iters", "4"]  # fmt: skip


@pytest.mark.parametrize(
    "layout, pp, virtual, stages",
    [
        ("Ett|ttL", 2, None, [[2], [2]]),
        ("Et|t|t|tL", 2, 2, [[1, 1], [1, 1]]),
        ("E|tt|ttL", 3, None, [[0], [2], [2]]),
        ("Et*2|(t|)*2L", 2, 2, [[2, 1], [1, 0]]),
    ],
)
def test_layouts_parse_to_each_stages_layers(layout, pp, virtual, stages):
    from megatron.core.transformer.enums import LayerType

    parsed = parse_pipeline_layout(layout, pp, num_layers=4)
    assert layout_virtual_size(layout, pp) == virtual
    assert [[chunk.count(LayerType.decoder) for chunk in rank] for rank in parsed.layout] == stages
    argv = [*BASE, "--pipeline-model-parallel-size", str(pp),
            "--pipeline-model-parallel-layout", layout]  # fmt: skip
    assert parse_config(argv).parallel.virtual_pipeline_size(4) == virtual


def test_canonical_layout_writes_repetitions_out():
    assert canonical_layout("Et*2|(t|)*2L") == "Ett|t|t|L"
    assert canonical_layout("E,t,t|ttL") == "Ett|ttL"  # (commas are cosmetic)
    assert canonical_layout(None) is None


@pytest.mark.parametrize(
    "layout, pp, mtp, message",
    [
        ("Etx|tttL", 2, None, "Invalid layer character: x"),
        ("Et|t|ttL", 2, None, "must be divisible by pipeline_model_parallel_size"),
        ("Et|tL", 2, None, "Number of decoder layers 2must match num_layers 4"),
        ("tE|tttL", 2, None, "The first layer must be embedding"),
        ("Ett|tLt", 2, None, "The last layer must be loss"),
        ("Ett|ttL", 2, 1, "Number of mtp layers in layout must match mtp_num_layers"),
        ("Ettm|ttL", 2, 1, "decoder layers must be placed before MTP layers"),
        ("Ett|tt|m|L", 2, 1, "the MTP heads (m) go in the last stage, with the loss"),
    ],
)
def test_layouts_that_do_not_fit_name_the_flag(layout, pp, mtp, message):
    with pytest.raises(ConfigError) as refused:
        check_parallel_layout(get_preset("tiny"), 1, pp, layout=layout, mtp_num_layers=mtp)
    line = str(refused.value)
    assert line.startswith(f"--pipeline-model-parallel-layout {layout!r}: ")
    assert message in line and "\n" not in line


def test_the_layout_replaces_the_other_stage_flags(capsys):
    base = [*BASE, "--pipeline-model-parallel-size", "2",
            "--pipeline-model-parallel-layout", "Ett|ttL"]  # fmt: skip
    for other in (["--decoder-first-pipeline-num-layers", "1"],
                  ["--num-virtual-stages-per-pipeline-rank", "2"],
                  ["--account-for-loss-in-pipeline-split"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_config(base + other)
        assert f"give it or {other[0]}, not both" in capsys.readouterr().err


def _built_stages(rank, world, layout, virtual, mtp=None):
    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model

    launch.initialize(device="cpu", pipeline_model_parallel_size=2,
                      virtual_pipeline_model_parallel_size=virtual)  # fmt: skip
    opts = ModelBuildOptions(transformer_impl="torch", pipeline_layout=layout, mtp_num_layers=mtp)
    chunks = build_model(get_preset("tiny"), opts)
    heads = [len(c.mtp.layers) if getattr(c, "mtp", None) is not None else 0 for c in chunks]
    built = [(len(c.decoder.layers), c.pre_process, c.post_process) for c in chunks]
    return built if mtp is None else (built, heads)


@pytest.mark.parametrize(
    "layout, virtual, built",
    [
        ("E|ttttL", None, [[(0, True, False)], [(4, False, True)]]),
        ("Et*2|(t|)*2L", 2, [[(2, True, False), (1, False, False)],
                             [(1, False, False), (0, False, True)]]),
    ],
)  # fmt: skip
def test_each_rank_builds_the_layers_its_stages_hold(layout, virtual, built):
    """The model chunks built on each rank hold the layout's layers (a stage of the embedding
    alone, a last chunk of the loss alone), the embedding first and the loss last."""
    from tests.dist_helpers import run_distributed

    assert run_distributed(_built_stages, 2, layout, virtual) == built


def test_mtp_heads_sit_with_the_loss():
    from tests.dist_helpers import run_distributed

    stages = run_distributed(_built_stages, 2, "Ett|ttmL", None, 1)
    assert stages == [([(2, True, False)], [0]), ([(2, False, True)], [1])]
