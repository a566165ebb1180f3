"""The sync-free gradient path (``training/optimizer.py``) against megatron-core's own.

Two identical tiny models take the same backward; one goes through megatron-core's
``finalize_model_grads`` + ``optimizer.step()``, the other through ``finalize_grads`` +
``OptimizerStep``. The gradient norm must equal an independent float64 norm of the all-reduced,
per-token-scaled gradients; the updated parameters must equal megatron-core's (bit for bit when
nothing is clipped); and our path must not read anything back to the host. One rank, and two
data-parallel ranks (the token count and the gradients are all-reduced), with the plain and the
distributed optimizer (gradients reduce-scattered, the norm summed over the shards, parameters
all-gathered).
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import run_distributed

SEQ = 16


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
    return [_compare(rank, clip, flags) for clip in clips]


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


@pytest.mark.parametrize(
    "world, flags",
    [(1, ()), (2, ()), (2, ("--use-distributed-optimizer",))],
    ids=["dp1", "dp2", "dp2-distributed"],
)
def test_matches_megatron_core_without_syncs(world, flags):
    clips = (0.05, 1e6)  # clipped, not clipped
    results = [r for rank in run_distributed(_worker, world, clips, flags) for r in rank]
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
