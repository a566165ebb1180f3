"""Resuming with another learning-rate schedule (``training/optimizer.py``): refused with the
flags and both values, unless Megatron-LM's --override-opt-param-scheduler (this run's schedule)
or --use-checkpoint-opt-param-scheduler (the saved one); and the scheduler built on a schedule
gives megatron-core's own learning rates for it, also after a load replaced the optimizer's
parameter groups with another run's. Megatron-LM's sample-based flags (--train-samples, ...,
--lr-warmup-fraction) give Megatron-LM's rates, whose scheduler counts samples."""

from __future__ import annotations

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_slm.checkpoint import CheckpointInfo
from megatron_slm.errors import CheckpointError, ConfigError
from megatron_slm.training.config import CheckpointArgs, parse_config
from megatron_slm.training.optimizer import (
    lr_schedule,
    lr_scheduler,
    restore_lr_schedule,
    resume_lr_schedule,
)
from tests.functional.pretrain_helpers import megatron_rates

BASE = ["--train-iters", "100", "--lr", "1e-3", "--lr-warmup-iters", "10"]


def _ckpt(schedule) -> CheckpointInfo:
    return CheckpointInfo("ckpt/iter_0000050", {"lr_schedule": schedule})


def test_the_same_schedule_resumes_and_another_is_refused_naming_the_flags():
    saved = lr_schedule(parse_config(BASE), 100)
    assert saved["lr_decay_iters"] == 100 and saved["wsd_decay_iters"] is None
    assert resume_lr_schedule(parse_config(BASE), 100, _ckpt(saved)) == saved
    longer = parse_config(["--load", "ckpt", *BASE, "--train-iters", "200", "--min-lr", "1e-5"])
    with pytest.raises(ConfigError) as err:
        resume_lr_schedule(longer, 200, _ckpt(saved))
    message = str(err.value)
    assert message.startswith("--load ckpt/iter_0000050: its learning-rate schedule differs")
    assert "--min-lr saved 0.0, this run 1e-05" in message
    assert "--lr-decay-iters (default: the training steps) saved 100, this run 200" in message
    assert "--lr saved" not in message  # only what differs
    assert "--override-opt-param-scheduler" in message


def test_a_constant_rate_resumes_for_longer():
    """A constant rate ignores the decay's length and floor: more steps are not a difference."""
    const = [*BASE, "--lr-decay-style", "constant"]
    saved = lr_schedule(parse_config(const), 100)
    cfg = parse_config(["--load", "ckpt", *const, "--train-iters", "300", "--min-lr", "1e-5"])
    assert resume_lr_schedule(cfg, 300, _ckpt(saved)) == lr_schedule(cfg, 300)
    with pytest.raises(ConfigError, match="--lr saved 0.001, this run 0.002"):
        resume_lr_schedule(parse_config([*const, "--lr", "2e-3"]), 100, _ckpt(saved))


@pytest.mark.parametrize(
    "flags, use_saved",
    [
        (["--override-opt-param-scheduler"], False),
        (["--override-opt_param-scheduler"], False),  # Megatron-LM's spelling
        (["--use-checkpoint-opt-param-scheduler"], True),
        (["--use-checkpoint-opt_param-scheduler"], True),
        (["--finetune"], False),  # a new run: no saved schedule applies
    ],
)
def test_the_flags_choose_the_schedule(flags, use_saved):
    saved = lr_schedule(parse_config(BASE), 100)
    cfg = parse_config(["--load", "ckpt", *BASE, "--train-iters", "200", *flags])
    run = lr_schedule(cfg, 200)
    assert run != saved
    assert resume_lr_schedule(cfg, 200, _ckpt(saved)) == (saved if use_saved else run)


def test_unrecorded_checkpoints_and_bad_records():
    cfg = parse_config(["--load", "ckpt", *BASE, "--use-checkpoint-opt-param-scheduler"])
    assert resume_lr_schedule(cfg, 100, CheckpointInfo("old", {})) == lr_schedule(cfg, 100)
    bad = dict(lr_schedule(cfg, 100), lr_decay_style="exotic")
    with pytest.raises(CheckpointError, match="lr_schedule.lr_decay_style is invalid"):
        resume_lr_schedule(cfg, 100, _ckpt(bad))
    bad = dict(lr_schedule(cfg, 100), lr_decay_iters="100")
    with pytest.raises(CheckpointError, match="lr_schedule.lr_decay_iters is invalid"):
        resume_lr_schedule(cfg, 100, _ckpt(bad))
    with pytest.raises(ConfigError, match="exclusive"):
        CheckpointArgs(override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=True)


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        scheduler.step(increment=1)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_restored_schedule_gives_megatron_cores_learning_rates():
    """A scheduler on the WSD schedule of 20 steps, loaded from a cosine run's state at step 5
    with that run's parameter groups: from step 6 on, the rates of megatron-core's scheduler
    built directly on the new schedule (the independent reference)."""

    def optimizer(max_lr, min_lr):
        param = torch.nn.Parameter(torch.zeros(2))
        return torch.optim.AdamW([{"params": [param], "max_lr": max_lr, "min_lr": min_lr}])

    old = parse_config(["--train-iters", "10", "--lr", "1e-3", "--lr-warmup-iters", "2"])
    new = parse_config(["--train-iters", "20", "--lr", "4e-3", "--min-lr", "1e-4",
                        "--lr-decay-style", "WSD"])  # fmt: skip
    old_opt = optimizer(1e-3, 0.0)
    old_sched = lr_scheduler(old_opt, lr_schedule(old, 10), 10)
    _lrs(old_sched, old_opt, 5)

    schedule = lr_schedule(new, 20)
    resumed_opt = optimizer(1e-3, 0.0)  # the loaded groups: the old run's bounds
    resumed = lr_scheduler(resumed_opt, schedule, 20)
    resumed.load_state_dict(old_sched.state_dict())
    restore_lr_schedule(resumed_opt, resumed, schedule)
    got = [resumed_opt.param_groups[0]["lr"], *_lrs(resumed, resumed_opt, 15)]

    ref_opt = optimizer(4e-3, 1e-4)
    reference = OptimizerParamScheduler(
        ref_opt, init_lr=0.0, max_lr=4e-3, min_lr=1e-4, lr_warmup_steps=0, lr_decay_steps=20,
        lr_decay_style="WSD", start_wd=0.1, end_wd=0.1, wd_incr_steps=20,
        wd_incr_style="constant", wsd_decay_steps=2, lr_wsd_decay_style="linear",
    )  # fmt: skip
    expected = _lrs(reference, ref_opt, 20)[4:]
    assert got == expected
    assert expected[0] == 4e-3 and expected[-1] == 1e-4  # stable, then the decay to --min-lr


def _validated(*flags):
    from megatron_slm.models.presets import get_preset
    from megatron_slm.training.config import validate

    cfg = parse_config(["--data-path", "x", "--global-batch-size", "8", "--lr", "1e-3", *flags])
    return cfg, validate(cfg, 1, get_preset("tiny"))


@pytest.mark.parametrize(
    "flags, steps, megatron_lm",
    [
        # 1000 samples at 8 a step: 125 steps; a warmup of 12.5 steps
        (["--train-samples", "1000", "--lr-warmup-samples", "100", "--lr-decay-samples", "900",
          "--min-lr", "1e-5"], 125,
         dict(min_lr=1e-5, lr_warmup_steps=100, lr_decay_steps=900, lr_decay_style="cosine",
              wd_incr_steps=1000)),
        # Megatron-LM's --lr-warmup-fraction: of the decay, here counted in steps
        (["--train-iters", "50", "--lr-warmup-fraction", "0.03", "--lr-decay-iters", "45",
          "--lr-decay-style", "linear"], 50,
         dict(min_lr=0.0, lr_warmup_steps=0.03 * 45 * 8, lr_decay_steps=45 * 8,
              lr_decay_style="linear", wd_incr_steps=400)),
        # 804 samples: 100 whole steps (the last 4 samples are not trained), WSD's final decay
        # in samples and shaped as asked
        (["--train-samples", "804", "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "300",
          "--lr-wsd-decay-style", "exponential", "--lr-warmup-fraction", "0.1", "--min-lr",
          "1e-4"], 100,
         dict(min_lr=1e-4, lr_warmup_steps=0.1 * 804, lr_decay_steps=804, lr_decay_style="WSD",
              wsd_decay_steps=300, lr_wsd_decay_style="exponential", wd_incr_steps=804)),
    ],
    ids=["samples", "warmup-fraction", "wsd-samples"],
)  # fmt: skip
def test_schedules_in_samples_give_megatron_lms_rates(flags, steps, megatron_lm):
    cfg, sizes = _validated(*flags)
    assert sizes.train_iters == steps
    schedule = lr_schedule(cfg, sizes.train_iters, sizes.global_batch_size)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    ours = _lrs(lr_scheduler(opt, schedule, sizes.train_iters), opt, steps)
    expected = megatron_rates(steps, 8, max_lr=1e-3, **megatron_lm)  # Megatron-LM's: samples
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert len(set(expected)) > 20  # the rates move: warmup and decay both ran


def test_a_wsd_record_from_before_its_style_flag_resumes_as_linear():
    cfg = parse_config([*BASE, "--load", "ckpt", "--lr-decay-style", "WSD"])
    old = {k: v for k, v in lr_schedule(cfg, 100).items() if k != "lr_wsd_decay_style"}
    assert resume_lr_schedule(cfg, 100, _ckpt(old))["lr_wsd_decay_style"] == "linear"
    cosine = parse_config([*BASE, "--load", "ckpt", "--lr-decay-style", "WSD",
                           "--lr-wsd-decay-style", "cosine"])  # fmt: skip
    with pytest.raises(ConfigError, match="--lr-wsd-decay-style saved linear, this run cosine"):
        resume_lr_schedule(cosine, 100, _ckpt(old))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train-samples", "80", "--lr-warmup-iters", "2"], "use --lr-warmup-samples"),
        (["--train-samples", "80", "--lr-decay-iters", "5"], "use --lr-decay-samples"),
        (["--train-iters", "10", "--lr-decay-samples", "40"], "use it with --train-samples"),
        (["--train-iters", "10", "--train-samples", "80"], "exactly one of"),
        (["--train-iters", "10", "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "1"],
         "--lr-warmup-fraction replaces"),
        (["--train-iters", "10", "--lr-warmup-fraction", "1.5"], "in [0, 1)"),
        (["--train-iters", "10", "--lr-wsd-decay-iters", "2"], "apply to --lr-decay-style WSD"),
        (["--train-samples", "7"], "less than one global batch (8)"),
        (["--train-samples", "80", "--lr-warmup-samples", "80"],
         "--lr-warmup-samples 80 (10 steps) must be smaller than the decay steps (10: "),
        (["--train-iters", "10", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "11"],
         "exceeds the decay"),
    ],
)  # fmt: skip
def test_schedule_flags_that_do_not_fit_are_refused(flags, message, capsys):
    with pytest.raises((ConfigError, SystemExit)) as err:
        _validated(*flags)
    text = capsys.readouterr().err if isinstance(err.value, SystemExit) else str(err.value)
    assert message in text


def _lrs_and_wds(scheduler, optimizer, steps, increment=1):
    """[lr, weight decay, lr, weight decay, ...] after each of ``steps`` steps."""
    out = []
    for _ in range(steps):
        scheduler.step(increment=increment)
        group = optimizer.param_groups[0]
        out.extend((group["lr"], group["weight_decay"]))
    return out


@pytest.mark.parametrize(
    "flags, steps, increment, megatron_lm",
    [
        # warmup from 1e-4, weight decay rising linearly over the 40 steps
        (["--train-iters", "40", "--lr-warmup-iters", "5", "--lr-warmup-init", "1e-4",
          "--weight-decay-incr-style", "linear", "--start-weight-decay", "0.0",
          "--end-weight-decay", "0.2"], 40, 1,
         dict(init_lr=1e-4, lr_warmup_steps=5, lr_decay_steps=40, start_wd=0.0, end_wd=0.2,
              wd_incr_steps=40, wd_incr_style="linear")),
        # Megatron-LM's sample counting: the increment runs over --train-samples
        (["--train-samples", "300", "--lr-warmup-samples", "40", "--lr-warmup-init", "5e-4",
          "--weight-decay-incr-style", "cosine", "--start-weight-decay", "0.05",
          "--end-weight-decay", "0.3"], 37, 8,
         dict(init_lr=5e-4, lr_warmup_steps=40, lr_decay_steps=300, start_wd=0.05, end_wd=0.3,
              wd_incr_steps=300, wd_incr_style="cosine")),
    ],
    ids=["steps", "samples"],
)  # fmt: skip
def test_warmup_init_and_weight_decay_increments_are_megatron_cores(
    flags, steps, increment, megatron_lm
):
    """--lr-warmup-init and --start/--end-weight-decay with --weight-decay-incr-style: per step,
    the learning rate and weight decay of megatron-core's scheduler built directly on Megatron-
    LM's values (counted in samples where Megatron-LM counts them so)."""
    cfg, sizes = _validated(*flags)
    assert sizes.train_iters == steps
    schedule = lr_schedule(cfg, sizes.train_iters, sizes.global_batch_size)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    ours = _lrs_and_wds(lr_scheduler(opt, schedule, sizes.train_iters), opt, steps)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    reference = OptimizerParamScheduler(
        ref_opt, max_lr=1e-3, min_lr=0.0, lr_decay_style="cosine", **megatron_lm
    )
    expected = _lrs_and_wds(reference, ref_opt, steps, increment)
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-18)
    wds = expected[1::2]
    assert wds[0] != wds[-1] and len(set(wds)) > 10  # the weight decay moves
    assert expected[0] > megatron_lm["init_lr"]  # the warmup starts from --lr-warmup-init


def test_weight_decay_records_resume_and_differences_are_refused():
    incr = ["--weight-decay-incr-style", "linear", "--start-weight-decay", "0.0"]
    cfg = parse_config(["--load", "ckpt", *BASE, *incr, "--end-weight-decay", "0.1"])
    saved = lr_schedule(cfg, 100)
    assert resume_lr_schedule(cfg, 100, _ckpt(saved)) == saved
    other = parse_config(["--load", "ckpt", *BASE, *incr, "--end-weight-decay", "0.3"])
    with pytest.raises(ConfigError, match="--end-weight-decay saved 0.1, this run 0.3"):
        resume_lr_schedule(other, 100, _ckpt(saved))
    # A record from before these flags: constant weight decay, warmup from 0.
    plain = parse_config(["--load", "ckpt", *BASE])
    new_keys = ("lr_warmup_init", "end_weight_decay", "weight_decay_incr_style",
                "weight_decay_incr_iters")  # fmt: skip
    old = {k: v for k, v in lr_schedule(plain, 100).items() if k not in new_keys}
    assert resume_lr_schedule(plain, 100, _ckpt(old)) == lr_schedule(plain, 100)
    warm = parse_config(["--load", "ckpt", *BASE, "--lr-warmup-init", "1e-5"])
    with pytest.raises(ConfigError, match="--lr-warmup-init saved 0.0, this run 1e-05"):
        resume_lr_schedule(warm, 100, _ckpt(old))
    bad = dict(saved, weight_decay_incr_style="sideways")
    use_saved = parse_config(["--load", "ckpt", *BASE, "--use-checkpoint-opt-param-scheduler"])
    with pytest.raises(CheckpointError, match="lr_schedule.weight_decay_incr_style is invalid"):
        resume_lr_schedule(use_saved, 100, _ckpt(bad))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--start-weight-decay", "0.1"], "need --weight-decay-incr-style linear or cosine"),
        (["--weight-decay-incr-style", "linear", "--end-weight-decay", "0.1"],
         "needs --start-weight-decay and --end-weight-decay"),
        (["--weight-decay-incr-style", "sideways"], "invalid choice"),
        (["--lr-warmup-init", "-1"], "--lr-warmup-init must be >= 0"),
        (["--lr-warmup-init", "2e-3"], "--lr-warmup-init 0.002 exceeds --lr 0.001"),
        (["--weight-decay-incr-style", "linear", "--start-weight-decay", "0.2",
          "--end-weight-decay", "0.1"], "--end-weight-decay 0.1 is below --start-weight-decay"),
    ],
)  # fmt: skip
def test_weight_decay_flags_that_do_not_fit_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config([*BASE, *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
