"""The interleaved schedule's Megatron-LM flags: --no-overlap-p2p-communication (overlapped
sends and receives are the default, as in Megatron-LM) and
--microbatch-group-size-per-virtual-pipeline-stage, checked against megatron-core's rules before
any work and handed to megatron-core's config (its schedule reads them from there)."""

from __future__ import annotations

import pytest

from megatron_slm.training.config import parse_config, validate
from tests.functional.pretrain_helpers import VOCAB, VOCAB_FLAG, refusal

VIRTUAL = ("--pipeline-model-parallel-size", 2, "--num-virtual-stages-per-pipeline-rank", 2)
GROUP = "--microbatch-group-size-per-virtual-pipeline-stage"


def _sizes(*argv, world=2):
    base = ("--data-path", "A", "--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB_FLAG,
            "--model-preset", "tiny", "--micro-batch-size", 2)  # fmt: skip
    length = () if "--train-samples" in argv else ("--train-iters", 5)
    cfg = parse_config([str(a) for a in (*base, *length, *argv)])
    return validate(cfg, world, cfg.model.architecture(VOCAB))


@pytest.mark.parametrize(
    "argv, message",
    [
        ((GROUP, 2, "--pipeline-model-parallel-size", 2), f"{GROUP} is a flag of the interleaved"),
        (("--no-overlap-p2p-communication",), "--no-overlap-p2p-communication is a flag of the"),
        ((*VIRTUAL, "--no-overlap-p2p-communication"), "needs --pipeline-model-parallel-size > 2"),
        ((*VIRTUAL, GROUP, 1, "--global-batch-size", 8), f"{GROUP} 1 is less than --pipeline"),
        ((*VIRTUAL, GROUP, 5, "--global-batch-size", 8), f"{GROUP} 5 runs micro-batches in groups "
                                                         "of 5: a step of 4 micro-batches needs"),
        ((*VIRTUAL, GROUP, 3, "--global-batch-size", 8), "groups of 3: a step of 4 micro-ba"),
        ((*VIRTUAL, "--global-batch-size", 10), "the interleaved schedule (--pipeline-model-"
                                                "parallel-size 2) runs micro-batches in groups of "
                                                "2: a step of 5 micro-batches"),  # the default
        ((*VIRTUAL, GROUP, 6, "--global-batch-size", 16, "--train-samples", 64,
          "--rampup-batch-size", 8, 8, 16), "groups of 6: a step of 4 micro-batches (global batch"
                                            " 8) needs at least one group"),
    ],
)  # fmt: skip
def test_what_megatron_core_would_refuse_is_one_line(argv, message, capsys):
    line = refusal(lambda: _sizes(*argv, world=4 if "--no-overlap" in str(argv) else 2), capsys)
    assert message in line, line


def test_the_most_a_partial_step_runs():
    """A full validation's last, partial batch runs the most micro-batches megatron-core's rule
    allows: at the default group (the pipeline size) its multiples, as before the flag."""
    from megatron_slm.training.config import runnable_microbatches

    assert [runnable_microbatches(m, 2, 2) for m in range(8)] == [0, 0, 2, 2, 4, 4, 6, 6]
    assert [runnable_microbatches(m, 3, 2) for m in range(9)] == [0, 0, 0, 3, 3, 5, 6, 6, 8]


def test_groups_that_fit_are_taken():
    """A group other than the pipeline size lets a step hold what is not a multiple of it (5
    micro-batches: a group of 3, then 2)."""
    assert _sizes(*VIRTUAL, GROUP, 3, "--global-batch-size", 10).num_microbatches == 5
    assert _sizes(*VIRTUAL, GROUP, 4, "--global-batch-size", 8).num_microbatches == 4


def test_the_flags_reach_megatron_cores_config(monkeypatch):
    """What megatron-core's interleaved schedule reads: overlapped, unbatched sends and receives
    by default (Megatron-LM's); the group size given, else megatron-core's (the pipeline size);
    without virtual stages no overlap (megatron-core's other schedules do not overlap)."""
    from megatron.core import parallel_state

    from megatron_slm.models import ModelBuildOptions
    from megatron_slm.models.presets import get_preset
    from megatron_slm.models.provider import build_transformer_config
    from megatron_slm.platform import cpu_backend_enabled

    getters = {"get_tensor_model_parallel_world_size": 1,
               "get_expert_tensor_parallel_world_size": 1,
               "get_pipeline_model_parallel_world_size": 2}  # fmt: skip
    for getter, size in getters.items():
        monkeypatch.setattr(parallel_state, getter, lambda s=size: s)
    model = get_preset("tiny")

    def config(**opts):
        c = build_transformer_config(model, ModelBuildOptions(**opts))
        return c.overlap_p2p_comm, c.batch_p2p_comm, c.microbatch_group_size_per_vp_stage

    assert config(virtual_stages=2) == (True, False, 2)
    assert config(virtual_stages=2, microbatch_group_size_per_vp_stage=4) == (True, False, 4)
    batched = not cpu_backend_enabled()  # (gloo pairs batched messages wrongly: never on CPU)
    assert config(virtual_stages=2, overlap_p2p_comm=False)[:2] == (False, batched)
    assert config()[0] is False
