"""Megatron-LM's training flags whose effect only a GPU has: ``--grad-reduce-in-bf16`` (the
gradient buffers in bf16), ``--profile`` under nsys (the CUDA profiler range opened and closed
around the asked steps), ``--empty-unused-memory-level 2``, the CUDA allocator's figures of
``--log-memory-to-tensorboard`` and the log-step figures on bf16 weights; and dropout with
selective recompute on CUDA, where the recompute must replay the forward's dropout masks
(megatron-core's RNG tracker): its gradients match those of the same step without recompute."""

from __future__ import annotations

import math

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.functional.pretrain_helpers import make_null_corpus, read_steps, tiny_args

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_null_corpus(str(tmp_path_factory.mktemp("flags_cuda")), "c", [30] * 80)


def _trainer(argv):
    from megatron_slm import launch
    from megatron_slm.training.config import parse_config
    from megatron_slm.training.loop import Trainer, plan_training

    cfg = parse_config([str(a) for a in [*argv, "--device", "cuda"]])
    plan = plan_training(cfg, 1)
    trainer = Trainer(cfg, plan, launch.initialize(device="cuda", seed=cfg.training.seed))
    for chunk in trainer.chunks:
        chunk.train()
    return trainer


def _close(trainer):
    trainer.batches.close()
    trainer.log.close(trainer.iteration)
    trainer.profiler.close()


def _bf16_worker(rank, world, prefix, log):
    calls = []
    trainer = _trainer(tiny_args(prefix, log, 4, "--bf16", "--grad-reduce-in-bf16", "--profile",
                                 "--profile-step-start", 1, "--profile-step-end", 3,
                                 "--empty-unused-memory-level", 2, "--log-memory-to-tensorboard",
                                 "--log-params-norm", "--log-num-zeros-in-grad"))  # fmt: skip
    grad_dtypes = {p.main_grad.dtype for p in trainer.chunks[0].parameters()}
    for _ in range(4):
        calls.append(("step", trainer.iteration))
        trainer.advance()
        calls.append(("profiling", trainer.profiler._active is not None))
    _close(trainer)
    return grad_dtypes, calls


def test_bf16_gradient_reduction_and_the_nsys_range(corpus, tmp_path):
    log = tmp_path / "log.jsonl"
    grad_dtypes, calls = run_distributed(_bf16_worker, 1, corpus, str(log))[0]
    assert grad_dtypes == {torch.bfloat16}
    # the range opens before step 2 (1 finished) and closes when step 3 is done
    open_after = [flag for kind, flag in calls if kind == "profiling"]
    assert open_after == [False, True, False, False]
    records = read_steps(log)
    assert all(math.isfinite(r["loss"]) for r in records)
    for r in records:  # (every step is a log step)
        assert 0 < r["mem_allocated_bytes"] <= r["mem_max_allocated_bytes"]
        assert r["mem_allocated_bytes"] <= r["mem_reserved_bytes"]
        assert math.isfinite(r["params_norm"]) and r["params_norm"] > 0
        assert 0 < r["num_zeros_in_grad"]


def _dropout_worker(rank, world, prefix, log):
    grads = {}
    for name, extra in (("none", ()), ("recompute", ("--recompute-granularity", "full"))):
        trainer = _trainer(tiny_args(prefix, log, 4, "--attention-dropout", 0.2,
                                     "--hidden-dropout", 0.2, *extra))  # fmt: skip
        trainer.train_step()
        grads[name] = torch.cat([p.main_grad.flatten() for p in trainer.chunks[0].parameters()])
        grads[name] = grads[name].cpu()
        _close(trainer)
    return grads


def test_recompute_replays_the_dropout_masks_on_cuda(corpus, tmp_path):
    grads = run_distributed(_dropout_worker, 1, corpus, str(tmp_path / "log.jsonl"))[0]
    torch.testing.assert_close(grads["recompute"], grads["none"], rtol=1e-4, atol=1e-6)


def _loss_scale_worker(rank, world, prefix, log):
    scales = {}
    for name, extra in (
        ("dynamic", ("--initial-loss-scale", 1024, "--loss-scale-window", 2, "--hysteresis", 1,
                     "--min-loss-scale", 16)),
        ("constant", ("--loss-scale", 512)),
    ):  # fmt: skip
        trainer = _trainer(tiny_args(prefix, log, 4, "--fp16", *extra))
        scaler = trainer.optimizer.grad_scaler
        seen = [float(scaler.scale)]
        for _ in range(4):
            trainer.advance()
            seen.append(float(scaler.scale))
        scales[name] = (type(scaler).__name__, seen)
        _close(trainer)
    return scales


def test_fp16_loss_scale_flags_set_megatron_cores_scaler(corpus, tmp_path):
    """--initial-loss-scale, --loss-scale-window, --hysteresis, --min-loss-scale: the dynamic
    scaler starts at 1024 and doubles every 2 steps without an overflow (a tiny model in fp16 has
    none); --loss-scale: a constant one."""
    scales = run_distributed(_loss_scale_worker, 1, corpus, str(tmp_path / "log.jsonl"))[0]
    kind, seen = scales["dynamic"]
    assert kind == "DynamicGradScaler" and seen == [1024, 1024, 2048, 2048, 4096]
    assert scales["constant"] == ("ConstantGradScaler", [512.0] * 5)


def _deterministic_run(rank, world, argv):
    import os

    from megatron_slm import pretrain

    os.environ["NCCL_ALGO"] = "Ring"
    assert pretrain.main([str(a) for a in argv]) == 0
    return torch.are_deterministic_algorithms_enabled()


def test_deterministic_mode_repeats_bitwise_on_the_gpu(corpus, tmp_path):
    """--deterministic-mode on CUDA (bf16, a blend of two sources, Rho-1's selection with the
    fused op, one MTP head): no op refuses torch's deterministic algorithms, and two runs give
    bitwise the same losses and gradient norms."""
    blend = ("--data-path", "0.5", corpus, "0.5", corpus)
    flags = ("--deterministic-mode", "--bf16", "--slm-ratio", 0.5, "--slm-select-mode", "loss",
             "--mtp-num-layers", 1, "--device", "cuda")  # fmt: skip
    runs = []
    for i in range(2):
        log = str(tmp_path / f"run{i}.jsonl")
        (enabled,) = run_distributed(
            _deterministic_run, 1, tiny_args(corpus, log, 4, *blend, *flags)
        )
        assert enabled
        runs.append([(r["loss"], r["grad_norm"], r["mtp_1_loss"]) for r in read_steps(log)])
    assert len(runs[0]) == 4 and runs[0] == runs[1]
