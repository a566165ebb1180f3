"""The sync-free gradient path (``training/optimizer.py``) against megatron-core's own.

Two identical tiny models take the same backward; one goes through megatron-core's
``finalize_model_grads`` + ``optimizer.step()``, the other through ``finalize_grads`` +
``OptimizerStep``. The gradient norm must equal an independent float64 norm of the all-reduced,
per-token-scaled gradients; the updated parameters must equal megatron-core's (bit for bit when
nothing is clipped); and our path must not read anything back to the host. One rank, and two
data-parallel ranks (the token count and the gradients are all-reduced), with the plain and the
distributed optimizer (gradients reduce-scattered, the norm summed over the shards, parameters
all-gathered), and Muon beside AdamW (``--optimizer muon``).

A step whose gradient norm is not finite must change nothing (weights, Adam's moments and step
count, Muon's momentum), without a host read: after it, our next step must equal megatron-core's
first.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.dist_helpers import run_distributed

SEQ = 16
# Muon beside AdamW (fp32 iterations: a clipped step's rounding is not amplified by bf16's)
MUON = ("--optimizer", "muon", "--muon-fp32-matmul-prec", "highest")


def _setup(cfg):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_slm.models import ModelBuildOptions, build_model, get_preset
    from megatron_slm.training.optimizer import build_optimizer

    torch.manual_seed(3)
    model_parallel_cuda_manual_seed(3)
    (model,) = build_model(get_preset("tiny"), ModelBuildOptions())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer
    )
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    optimizer, _ = build_optimizer(cfg, [ddp], torch.float32, train_iters=10)
    return ddp, optimizer


def _backward(ddp, rank):
    """Summed per-token loss of a rank-specific batch; returns the token count (as the schedule
    does with ``calculate_per_token_loss``)."""
    tokens = torch.randint(0, 500, (2, SEQ), generator=torch.Generator().manual_seed(rank))
    pos = torch.arange(SEQ).expand(2, SEQ)
    ddp.zero_grad_buffer()
    loss = ddp(tokens, pos, None, labels=tokens)  # [b, s]
    loss.sum().backward()
    return torch.tensor(loss.numel(), dtype=torch.int)


def _worker(rank, world, clips, flags):
    from megatron_slm import launch

    launch.initialize(device="cpu")
    return [_compare(rank, clip, flags) for clip in clips], _skip_non_finite(rank, flags)


def _compare(rank, clip, flags):
    import torch.distributed as dist
    from megatron.core.distributed import finalize_model_grads

    from megatron_slm.training.config import parse_config
    from megatron_slm.training.optimizer import OptimizerStep, finalize_grads
    from tests.sync_counter import SyncCounter

    cfg = parse_config(["--train-iters", "10", "--clip-grad", str(clip), "--lr", "0.01", *flags])
    theirs, their_opt = _setup(cfg)
    ours, our_opt = _setup(cfg)

    n = _backward(theirs, rank)
    finalize_model_grads([theirs], n.clone())
    _, their_norm, _ = their_opt.step()

    n = _backward(ours, rank)
    # Independent norm: every rank's raw gradients summed, divided by the global token count.
    flat = torch.cat([p.main_grad.flatten() for p in ours.parameters()]).double()
    dist.all_reduce(flat)
    total_tokens = n.clone()
    dist.all_reduce(total_tokens)
    expected_grads = flat / total_tokens
    expected_norm = expected_grads.norm().item()
    expected_grads *= min(1.0, clip / (expected_norm + 1e-6))
    step = OptimizerStep(our_opt, clip, torch.device("cpu"))
    with SyncCounter() as counter:
        finalize_grads([ours], n.clone())
        ok, our_norm = step.step()
    assert ok
    clipped = torch.cat([p.main_grad.flatten() for p in ours.parameters()]).double()
    return {
        "clip": clip,
        "syncs": (counter.count, counter.report()),
        "grads": (clipped, expected_grads),
        "norms": (their_norm, our_norm.item(), expected_norm),
        "params": [
            (a.detach(), b.detach()) for a, b in zip(theirs.parameters(), ours.parameters())
        ],
    }


def _adam_state(opt) -> list[torch.Tensor]:
    from megatron_slm.optimizer_state import optimizer_parts

    return [
        t.clone()
        for part in optimizer_parts(opt)
        for state in part.optimizer.state.values()
        for t in state.values()
    ]


def _skip_non_finite(rank, flags):
    """A NaN in one rank's gradient, then a finite step; megatron-core takes the finite one only."""
    from megatron.core.distributed import finalize_model_grads

    from megatron_slm.training.config import parse_config
    from megatron_slm.training.optimizer import OptimizerStep, finalize_grads
    from tests.sync_counter import SyncCounter

    cfg = parse_config(["--train-iters", "10", "--clip-grad", "1e6", "--lr", "0.01", *flags])
    theirs, their_opt = _setup(cfg)
    ours, our_opt = _setup(cfg)
    n = _backward(theirs, rank)
    finalize_model_grads([theirs], n.clone())
    their_opt.step()

    step = OptimizerStep(our_opt, 1e6, torch.device("cpu"))
    before = [p.detach().clone() for p in ours.parameters()]
    n = _backward(ours, rank)
    if rank == 0:  # before the data-parallel reduction, as a NaN from the backward is
        next(ours.parameters()).main_grad.view(-1)[0] = float("nan")
    with SyncCounter() as counter:
        finalize_grads([ours], n.clone())
        _, nan_norm = step.step()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, ours.parameters()))
    state = _adam_state(our_opt)
    our_opt.zero_grad()  # as each training step starts: no .grad aliasing the gradient buffer
    n = _backward(ours, rank)
    finalize_grads([ours], n.clone())
    _, norm = step.step()
    return {
        "syncs": (counter.count, counter.report()),
        "norm": (nan_norm.item(), step.skips_on_device),
        "unchanged": unchanged,
        # a skipped first step leaves Adam's new state at zero (moments and step count)
        "state_zero": bool(state) and all(not t.any() for t in state),
        "next_norm": norm.item(),
        "params": [
            (a.detach(), b.detach()) for a, b in zip(theirs.parameters(), ours.parameters())
        ],
    }


@pytest.mark.parametrize(
    "world, flags",
    [(1, ()), (2, ()), (2, ("--use-distributed-optimizer",)), (2, MUON)],
    ids=["dp1", "dp2", "dp2-distributed", "dp2-muon"],
)
def test_matches_megatron_core_without_syncs(world, flags):
    clips = (0.05, 1e6)  # clipped, not clipped
    ranks = run_distributed(_worker, world, clips, flags)
    for _, skip in ranks:
        assert skip["syncs"][0] == 0, skip["syncs"][1]
        norm, on_device = skip["norm"]
        assert math.isnan(norm) and on_device
        assert skip["unchanged"] and skip["state_zero"]
        assert math.isfinite(skip["next_norm"])
        assert all(torch.equal(theirs, ours) for theirs, ours in skip["params"])
    results = [r for compared, _ in ranks for r in compared]
    assert [r["clip"] for r in results] == list(clips) * world
    for result in results:
        clip = result["clip"]
        count, report = result["syncs"]
        assert count == 0, report
        their_norm, our_norm, expected_norm = result["norms"]
        assert our_norm == pytest.approx(expected_norm, rel=1e-6)
        assert their_norm == pytest.approx(expected_norm, rel=1e-6)
        assert (clip < expected_norm) == (clip == clips[0])  # both branches are exercised
        # The gradients the update used: scaled by min(1, clip / norm) on the device (the
        # distributed optimizer's buffers hold this rank's reduced shard only).
        if not flags:
            torch.testing.assert_close(*result["grads"], rtol=1e-6, atol=1e-9)
        if clip < expected_norm:  # clipped: the coefficient is rounded differently (fp32 here)
            for theirs, ours in result["params"]:
                torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        else:  # a multiply by exactly 1.0: the same update as megatron-core's
            assert all(torch.equal(theirs, ours) for theirs, ours in result["params"])
