"""--step-batch-size-schedule against Megatron-LM's rules, step by step.

megatron-core's ``StepBatchsizeNumMicroBatchesCalculator`` is newer than every released
megatron-core, so the reference here is its rule applied one step at a time: the size of a step
is that of the last threshold (tokens // --seq-length) the consumed samples have reached, and
--train-samples takes steps until at least that many are consumed (``update_train_iters``).
``StepBatchSchedule`` computes the same by whole segments. In the real ``Trainer``: each step
trains the schedule's batch, the learning rate is megatron-core's scheduler counting samples as
Megatron-LM steps it (full batches of the last size), a resume in mid-schedule continues it
exactly, and a resume with another schedule is refused.
"""

from __future__ import annotations

from functools import partial

import pytest

from megatron_slm.errors import ConfigError
from megatron_slm.training.config import parse_config, validate
from megatron_slm.training.step_batch_schedule import parse_step_schedule
from tests.dist_helpers import run_distributed
from tests.functional.pretrain_helpers import (
    VOCAB,
    VOCAB_FLAG,
    check_growing_batch,
    make_null_corpus,
    refusal,
    whole_and_resumed_runs,
)

GPT3 = "0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536"  # Megatron-LM's GPT-3 175B example


def _size_by_rule(entries, consumed):
    """Megatron-LM's lookup: the size of the last entry whose threshold has been reached."""
    size = entries[0][1]
    for threshold, entry_size in entries:
        if consumed >= threshold:
            size = entry_size
    return size


def _steps_by_rule(entries, train_samples=None, iters=None):
    """(steps, consumed) one step at a time: until ``train_samples`` are consumed, or ``iters``
    steps."""
    steps, consumed = 0, 0
    while (consumed < train_samples) if iters is None else (steps < iters):
        consumed += _size_by_rule(entries, consumed)
        steps += 1
    return steps, consumed


def test_megatron_lms_gpt3_example_schedule():
    schedule = parse_step_schedule(GPT3, 2048)
    # 2.4B tokens of 2048 = 1,171,875 samples; the sizes as written
    assert schedule.steps == (
        (0, 16), (1171875, 320), (2343750, 624), (3515625, 928), (4687500, 1232), (5859375, 1536)
    )  # fmt: skip
    assert schedule.final == 1536
    assert [schedule.size_at(c) for c in (0, 1171874, 1171875, 5859374, 10**9)] == [
        16, 16, 320, 1232, 1536
    ]  # fmt: skip
    # Spaces or commas, any order, lower-case suffixes, fractional values: the same schedule
    same = parse_step_schedule("12b:1536,0:16, 2.4b:320 4800m:624 7.2B:928 9600000K:1232", 2048)
    assert same == schedule


@pytest.mark.parametrize(
    "text, seq",
    [(GPT3, 2048), ("0:2 256:4 512:8", 32), ("0:3 100:5 110:7 1000:1", 10), ("0:8", 16)],
)
def test_steps_and_samples_follow_the_rule(text, seq):
    schedule = parse_step_schedule(text, seq)
    entries = list(schedule.steps)
    last = entries[-1][0]
    probes = {0, 1, last, last + 1, 3 * last + 7}
    probes |= {t + d for t, _ in entries for d in (-1, 0, 1) if t + d >= 0}
    for consumed in sorted(probes):
        assert schedule.size_at(consumed) == _size_by_rule(entries, consumed), consumed
    small = text != GPT3  # (the GPT-3 schedule's steps are many; probe it at its thresholds)
    lengths = sorted(probes | ({2, 5, 17, 40, 123} if small else set()))
    for train_samples in [n for n in lengths if n > 0]:
        iters, consumed = _steps_by_rule(entries, train_samples=train_samples)
        assert schedule.train_iters(train_samples) == iters, train_samples
        assert schedule.consumed_after(iters) == consumed, iters
    for iters in (1, 2, 3, 7, 50):
        assert schedule.consumed_after(iters) == _steps_by_rule(entries, iters=iters)[1]


def _sizes(*argv, world=1, resumed=0):
    base = ("--data-path", "A", "--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB_FLAG,
            "--micro-batch-size", 2, "--seq-length", 32)  # fmt: skip
    cfg = parse_config([str(a) for a in (*base, *argv)])
    return validate(cfg, world, cfg.model.architecture(VOCAB), resumed)


def test_sizes_follow_the_schedule():
    # Thresholds of 256 and 512 tokens: 8 and 16 samples of 32 tokens
    flag = ("--step-batch-size-schedule", "0:2 256:4 512:8")
    by_steps = _sizes(*flag, "--train-iters", 7)
    assert (by_steps.global_batch_size, by_steps.train_iters) == (8, 7)
    assert [by_steps.global_batch_at(c) for c in range(0, 25, 2)] == [2] * 4 + [4] * 4 + [8] * 5
    assert [by_steps.microbatches_at(c) for c in (0, 8, 16)] == [1, 2, 4]
    # 2, 2, 2, 2, 4, 4, 8 samples; the learning-rate schedule spans 7 full batches (Megatron-LM's
    # --lr-decay-iters default x the full global batch, in samples)
    assert by_steps.train_samples == 24 and by_steps.schedule_iters == 7
    by_samples = _sizes(*flag, "--train-samples", 30, "--global-batch-size", 8)
    # 4 steps of 2, 2 of 4, then 8s until 30 are passed: 16 -> 24 -> 32
    assert (by_samples.train_iters, by_samples.train_samples) == (8, 32)
    assert by_samples.schedule_iters == 32 // 8
    by_tokens = _sizes(*flag, "--train-tokens", 30 * 32 - 5)  # 30 samples, the last one partly
    assert (by_tokens.train_iters, by_tokens.train_samples) == (8, 32)
    # A resumed run at 16 samples trains at 8 only: 8 samples split into 4 ranks' micro-batches
    assert _sizes(*flag, "--train-iters", 7, world=4, resumed=16).train_iters == 7


@pytest.mark.parametrize(
    "argv, message",
    [
        (("0:2 256:4 512:8", "--train-iters", 3, "--global-batch-size", 4),
         "--global-batch-size 4 differs from the last size of --step-batch-size-schedule (8)"),
        (("0:2 256:4", "--train-samples", 9, "--rampup-batch-size", 2, 2, 8),
         "either --rampup-batch-size or --step-batch-size-schedule"),
        (("64:2 256:4", "--train-iters", 3), "must be 0 (the size training starts at), got 64"),
        (("0:2 40:4 50:8", "--train-iters", 3), "same sample count (1 samples of --seq-length 32)"),
        (("0:2 2x:4", "--train-iters", 3), "'2x:4' is not THRESHOLD:SIZE with numbers"),
        (("0:2 256", "--train-iters", 3), "'256' is not THRESHOLD:SIZE"),
        (("0:0 256:4", "--train-iters", 3), "every global batch size must be >= 1, got 0"),
        ((" , ", "--train-iters", 3), "--step-batch-size-schedule is empty"),
        (("0:2 256:3 512:4", "--train-iters", 3), "global batch size 3 is not a multiple of 2"),
        (("0:2 256:4", "--train-iters", 3, "--train-samples-from", "l.json"), "list's global"),
    ],
)  # fmt: skip
def test_schedules_that_do_not_fit_are_one_line(argv, message, capsys):
    line = refusal(lambda: _sizes("--step-batch-size-schedule", *argv), capsys)
    assert message in line


def test_every_size_to_come_fits_the_data_parallel_size():
    flag = ("--step-batch-size-schedule", "0:2 256:4 512:8", "--train-iters", 7)
    with pytest.raises(ConfigError, match="size 2 is not a multiple of 4 "):
        _sizes(*flag, world=2)
    with pytest.raises(ConfigError, match="size 4 is not a multiple of 8 "):
        _sizes(*flag, world=4, resumed=8)
    interleaved = ("--num-layers-per-virtual-pipeline-stage", 1, "--pipeline-model-parallel-size",
                   2, "--model-preset", "tiny")  # fmt: skip
    with pytest.raises(ConfigError, match=r"groups of 2: a step of 1 micro-batches \(global "):
        _sizes(*interleaved, *flag, world=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_null_corpus(str(tmp_path_factory.mktemp("steps")), "c", [30] * 80)


SCHEDULE = ("--step-batch-size-schedule", "0:2 256:4 512:8")


def _argv(prefix, log, *extra):
    return ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB_FLAG,
            "--model-preset", "tiny", "--seq-length", 32, "--micro-batch-size", 2,
            "--train-iters", 7, "--lr", "3e-3", "--lr-warmup-iters", 2, "--eval-interval", 0,
            "--log-interval", 1, "--split", "100,0,0", "--num-workers", 0,
            "--log-loss-file", log, *SCHEDULE, *extra]  # fmt: skip


def _schedule_worker(rank, world, prefix, tmp):
    # stopped after step 5 (at 12 samples, between two thresholds); resumed with another schedule
    argv = partial(_argv, prefix)
    return whole_and_resumed_runs(argv, tmp, 5, (*SCHEDULE[:1], "0:2 512:8"))


def test_the_trainer_trains_the_schedule(corpus, tmp_path):
    runs, position, refused = run_distributed(_schedule_worker, 1, corpus, str(tmp_path))[0]
    # --lr-warmup-iters and the decay (--train-iters) in full batches of 8
    check_growing_batch(
        runs, [2, 2, 2, 2, 4, 4, 8], max_lr=3e-3, min_lr=0.0, lr_warmup_steps=2 * 8,
        lr_decay_steps=7 * 8, lr_decay_style="cosine", wd_incr_steps=7 * 8,
    )  # fmt: skip
    assert position == pytest.approx(12 / 8)  # resumed after 12 samples
    assert refused.endswith(
        "it was trained with --step-batch-size-schedule '0:2 256:4 512:8', this run gives "
        "'0:2 512:8': resume with the saved one (--finetune starts a new run from its weights)"
    )
