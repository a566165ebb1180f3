"""--rampup-batch-size against megatron-core's ramp-up calculator and Megatron-LM's counting.

The global batch size at every consumed-sample count is megatron-core's
``RampupBatchsizeNumMicroBatchesCalculator``'s; the step count of --train-samples is Megatron-LM's
``update_train_iters`` loop run on that calculator. In the real ``Trainer``: each step trains the
ramp's batch (logged, consumed), the learning rate is megatron-core's scheduler counting samples
as Megatron-LM steps it, the first steps are exactly those of a run at the start batch size, a
resume in the middle of the ramp continues it exactly, and a resume with another ramp is refused.
"""

from __future__ import annotations

from functools import partial

import pytest

from megatron_slm.errors import ConfigError
from megatron_slm.training.batch_ramp import BatchRamp
from megatron_slm.training.config import TrainingArgs, parse_config, validate
from tests.dist_helpers import run_distributed
from tests.functional.pretrain_helpers import (
    VOCAB,
    VOCAB_FLAG,
    check_growing_batch,
    close_trainer,
    cpu_trainer,
    make_null_corpus,
    read_steps,
    refusal,
    whole_and_resumed_runs,
)

RAMPS = [  # (start, increment, ramp samples, global batch size)
    (2, 2, 12, 8),
    (16, 16, 5859, 1536),  # Megatron-LM's GPT-3 example, its ramp scaled down
    (4, 4, 100, 32),
    (3, 1, 7, 10),  # more increments than samples per increment
]


def _calculator(start, increment, samples, gbs):
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    return RampupBatchsizeNumMicroBatchesCalculator(
        gbs, 1, 1, False, 1, start, increment, samples
    )  # (micro-batch 1, one data-parallel rank: the size itself is what is compared)


def _megatron_train_iters(calc, samples, gbs, train_samples):
    """Megatron-LM's update_train_iters for sample-based training with a ramp."""
    iters, consumed = 0, 0
    while consumed <= samples and consumed <= train_samples:
        calc.update(consumed, consistency_check=False)
        consumed += calc.get_current_global_batch_size()
        iters += 1
    if train_samples > consumed:
        iters += (train_samples - consumed) // gbs
    return iters


@pytest.mark.parametrize("start, increment, samples, gbs", RAMPS)
def test_the_ramp_is_megatron_cores(start, increment, samples, gbs):
    ramp, calc = (
        BatchRamp(start, increment, samples, gbs),
        _calculator(start, increment, samples, gbs),
    )
    for consumed in range(0, samples + 3 * gbs):
        calc.update(consumed, consistency_check=False)
        assert ramp.size_at(consumed) == calc.get_current_global_batch_size(), consumed
    for train_samples in (1, samples // 2, samples, samples + 1, 5 * samples + 7):
        iters = ramp.train_iters(train_samples)
        expected = _megatron_train_iters(calc, samples, gbs, train_samples)
        assert iters == expected, train_samples
        consumed = 0  # the samples those steps take, one step at a time
        for _ in range(iters):
            calc.update(consumed, consistency_check=False)
            consumed += calc.get_current_global_batch_size()
        assert ramp.consumed_after(iters) == consumed


def _sizes(*argv, world=1):
    base = ("--data-path", "A", "--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB_FLAG,
            "--micro-batch-size", 2, "--global-batch-size", 8, "--train-samples", 46)  # fmt: skip
    cfg = parse_config([str(a) for a in (*base, *argv)])
    return validate(cfg, world, cfg.model.architecture(VOCAB))


def test_sizes_follow_the_ramp():
    sizes = _sizes("--rampup-batch-size", 2, 2, 12)
    # 4 samples per increment: 2, 2, 4, 6 (14 samples, past the ramp), then 8 x 4 of the 32 left
    assert sizes.train_iters == 8 and sizes.train_samples == 46
    assert [sizes.global_batch_at(c) for c in (0, 2, 4, 8, 14)] == [2, 2, 4, 6, 8]
    assert [sizes.microbatches_at(c) for c in (0, 4, 8, 14)] == [1, 2, 3, 4]
    assert sizes.schedule_iters == 46 // 8
    plain = _sizes()
    assert (plain.train_iters, plain.train_samples, plain.schedule_iters) == (5, 40, 5)
    assert plain.microbatches_at(123) == 4 and plain.batch_schedule is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--rampup-batch-size", 2, 2, 12, "--train-iters", 5), "exactly one of"),
        (("--rampup-batch-size", 0, 2, 12), "the start batch size must be >= 1"),
        (("--rampup-batch-size", 2, 2, 0), "the ramp samples must be >= 1"),
        (("--rampup-batch-size", 8, 2, 12), "must be smaller than --global-batch-size 8"),
        (("--rampup-batch-size", 2, 4, 12), "8 minus the start 2 is not a multiple of the incr"),
        (("--rampup-batch-size", 2, 1, 12), "trains at a global batch of 3, not a multiple of 2"),
        (("--rampup-batch-size", 2, 2), "expected 3 arguments"),
        (("--rampup-batch-size", 2, 2, 12, "--train-samples-from", "l.json"), "list's global"),
    ],
)  # fmt: skip
def test_ramps_that_do_not_fit_are_one_line(argv, message, capsys):
    assert message in refusal(lambda: _sizes(*argv), capsys)


def test_megatron_lms_other_ramp_rules():
    """No ramp for iteration-based training (Megatron-LM's rule); with the interleaved schedule
    every size of the ramp splits into a multiple of the pipeline size of micro-batches."""
    with pytest.raises(ConfigError, match="train with --train-samples"):
        TrainingArgs(train_iters=5, rampup_batch_size=[2, 2, 12])
    interleaved = ("--num-layers-per-virtual-pipeline-stage", 1, "--pipeline-model-parallel-size",
                   2, "--model-preset", "tiny", "--global-batch-size", 16)  # fmt: skip
    with pytest.raises(ConfigError, match=r"groups of 2: a step of 1 micro-batches \(global "):
        _sizes(*interleaved, "--rampup-batch-size", 2, 2, 12, world=2)
    assert _sizes(*interleaved, "--rampup-batch-size", 4, 4, 12, world=2).train_iters > 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_null_corpus(str(tmp_path_factory.mktemp("ramp")), "c", [30] * 80)


def _argv(prefix, log, *extra):
    return ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB_FLAG,
            "--model-preset", "tiny", "--seq-length", 32, "--micro-batch-size", 2,
            "--train-samples", 46, "--lr", "3e-3", "--eval-interval", 0, "--log-interval", 1,
            "--split", "100,0,0", "--num-workers", 0, "--log-loss-file", log, *extra]  # fmt: skip


RAMP = ("--global-batch-size", 8, "--rampup-batch-size", 2, 2, 12, "--lr-warmup-samples", 10)


def _ramp_worker(rank, world, prefix, tmp):
    runs = {}
    # The ramp's first two steps (2 samples each) against a run at 2 samples per step on a
    # constant rate: the same samples, gradients and updates.
    flat = ("--lr-decay-style", "constant")
    for name, extra in (("ramp", (*RAMP[:6], *flat)), ("at-2", ("--global-batch-size", 2, *flat))):
        trainer = cpu_trainer(_argv(prefix, f"{tmp}/{name}.jsonl", *extra))
        for _ in range(2):
            trainer.advance()
        close_trainer(trainer)
        runs[name] = read_steps(f"{tmp}/{name}.jsonl")
    # The whole ramp, and the same stopped after step 3 (mid-ramp) and resumed; another ramp.
    ramp = partial(_argv, prefix)
    runs_too, position, refused = whole_and_resumed_runs(
        lambda log, *extra: ramp(log, *RAMP, *extra), tmp, 3, (*RAMP[:3], 4, 2, 12)
    )
    return {**runs, **runs_too}, position, refused


def test_the_trainer_trains_the_ramp(corpus, tmp_path):
    runs, position, refused = run_distributed(_ramp_worker, 1, corpus, str(tmp_path))[0]
    for key in ("loss", "grad_norm", "consumed_samples", "global_batch_size"):
        assert [r[key] for r in runs["ramp"]] == [r[key] for r in runs["at-2"]], key
    # warmup and decay in samples (Megatron-LM's --train-samples schedule)
    check_growing_batch(
        runs, [2, 2, 4, 6, 8, 8, 8, 8], max_lr=3e-3, min_lr=0.0, lr_warmup_steps=10,
        lr_decay_steps=46, lr_decay_style="cosine", wd_incr_steps=46,
    )  # fmt: skip
    # Resumed after step 3 (8 samples: a schedule position of one full batch of 8)
    assert position == pytest.approx(8 / 8)
    assert refused.endswith(
        "it was trained with --rampup-batch-size 2 2 12, this run gives 4 2 12: resume with the "
        "saved one (--finetune starts a new run from its weights)"
    )
