"""The sync-free vocab-parallel cross entropy against torch's cross entropy on the full logits and
megatron-core's own function, at TP=2 (targets in and outside each rank's shard)."""

import torch

from tests.dist_helpers import run_distributed

S, B, V = 5, 3, 16  # sequence, batch, vocabulary (two shards of 8)


def _full_problem():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(S, B, V, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, V, (S, B), generator=g)
    grad_out = torch.rand(S, B, generator=g, dtype=torch.float64)
    return logits, target, grad_out


def _tp_worker(rank, world):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_ce

    from megatron_slm.models.cross_entropy import vocab_parallel_cross_entropy
    from tests.sync_counter import SyncCounter

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    logits, target, grad_out = _full_problem()
    shard = logits.chunk(world, dim=-1)[rank].float()  # [s, b, v/tp]
    results = {}
    for name, fn in (("ours", vocab_parallel_cross_entropy), ("megatron", megatron_ce)):
        x = shard.clone().requires_grad_()
        with SyncCounter() as counter:
            loss = fn(x.clone(), target)  # the functions overwrite their input
            loss.backward(grad_out.float())
        results[name] = (loss.detach(), x.grad, counter.count, counter.report())
    return results


def test_matches_torch_and_megatron_core_at_tp2():
    logits, target, grad_out = _full_problem()
    full = logits.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(
        full.flatten(0, 1), target.flatten(), reduction="none"
    ).view(S, B)
    ref.backward(grad_out)
    ref_grads = full.grad.chunk(2, dim=-1)
    for rank, results in enumerate(run_distributed(_tp_worker, 2)):
        loss, grad, count, report = results["ours"]
        assert count == 0, report
        # fp32 against a float64 reference: a few ulps of the largest values.
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad.double(), ref_grads[rank], rtol=1e-6, atol=1e-7)
        # Same helpers, same order as megatron-core's: bit-identical.
        mc_loss, mc_grad, _, _ = results["megatron"]
        assert torch.equal(loss, mc_loss) and torch.equal(grad, mc_grad)
