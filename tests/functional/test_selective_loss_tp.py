"""selective_cross_entropy in real gloo process groups: TP=1/2/4 against megatron-core's
vocab_parallel_cross_entropy and the full-vocabulary reference, and data-parallel scope (the
union of the DP ranks' selections equals the global top-k of the concatenated scores)."""

from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import run_distributed

S, B, V = 10, 3, 64
RATIO = 0.4
CONFIGS = [  # (mode, scope, ratio)
    ("excess", "microbatch", RATIO),
    ("excess", "sequence", RATIO),
    ("loss", "microbatch", 0.7),
    ("random", "sequence", 0.5),
    ("excess", "microbatch", 1.0),
]


def _data(dp_rank: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + dp_rank)
    logits = (torch.randn(S, B, V, generator=g) * 3).to(dtype)
    target = torch.randint(0, V, (S, B), generator=g)
    ref = torch.rand(S, B, generator=g) * 5
    ref[0, :] = float("nan")
    mask = torch.ones(S, B)
    mask[-1, 0] = 0
    # a tie: two identical tokens with the same reference loss
    logits[4, 1] = logits[4, 0]
    target[4, 1] = target[4, 0]
    ref[4, 1] = ref[4, 0]
    return logits, target, ref, mask


def _worker(rank, world_size, tp):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_slm import _extension
    from megatron_slm.ops import selective_cross_entropy
    from megatron_slm.ops.selective_loss_reference import reference_selective_cross_entropy

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    tp_rank = ps.get_tensor_model_parallel_rank()
    dp_rank = ps.get_data_parallel_rank()
    vl = V // tp
    cols = slice(tp_rank * vl, (tp_rank + 1) * vl)
    impls = ["torch"] + (["cpp"] if _extension.HAS_C else [])

    logits, target, ref, mask = _data(dp_rank)
    shard = logits[..., cols].contiguous()
    meg = vocab_parallel_cross_entropy(shard.clone(), target)
    w = torch.linspace(0.5, 1.5, S * B).reshape(S, B)

    for impl in impls:
        for mode, scope, ratio in CONFIGS:
            x = shard.clone().requires_grad_()
            out = selective_cross_entropy(
                x,
                target,
                ref_loss=ref,
                loss_mask=mask,
                ratio=ratio,
                scope=scope,
                mode=mode,
                impl=impl,
                seed=4,
            )
            (out.loss * w).sum().backward()
            torch.testing.assert_close(out.loss, meg, rtol=1e-5, atol=1e-6)
            xr = logits.clone().requires_grad_()
            lr, sr = reference_selective_cross_entropy(
                xr,
                target,
                ref_loss=ref,
                loss_mask=mask,
                ratio=ratio,
                scope=scope,
                mode=mode,
                seed=4,
            )
            (lr * w).sum().backward()
            assert torch.equal(out.selected, sr), (impl, mode, scope)
            torch.testing.assert_close(x.grad, xr.grad[..., cols], rtol=1e-5, atol=1e-6)
            assert torch.all(x.grad[~out.selected] == 0)

        # 16-bit: within 2x the error of a same-precision torch computation against fp32
        for dtype in (torch.bfloat16, torch.float16):
            low = logits.to(dtype)
            out = selective_cross_entropy(
                low[..., cols].contiguous(), target, mode="loss", impl=impl
            )
            truth = torch.logsumexp(logits, -1) - logits.gather(-1, target[..., None])[..., 0]
            torch_low = torch.nn.functional.cross_entropy(
                low.view(-1, V), target.view(-1), reduction="none"
            ).view(S, B)
            ours = (out.loss - truth).abs().max()
            base = (torch_low.float() - truth).abs().max()
            assert ours <= 2 * base + 1e-6, (impl, dtype, ours, base)

    # data-parallel scope: return what the parent needs to check the global top-k
    dp_results = {}
    for impl in impls:
        for mode in ("excess", "random"):
            x = shard.clone().requires_grad_()
            out = selective_cross_entropy(
                x,
                target,
                ref_loss=ref,
                loss_mask=mask,
                ratio=RATIO,
                scope="data-parallel",
                mode=mode,
                impl=impl,
                seed=9,
            )
            (out.loss * w).sum().backward()
            xr = logits.clone().requires_grad_()
            lr, _ = reference_selective_cross_entropy(
                xr, target, ref_loss=ref, loss_mask=mask, selected=out.selected
            )
            (lr * w).sum().backward()
            torch.testing.assert_close(x.grad, xr.grad[..., cols], rtol=1e-5, atol=1e-6)
            dp_results[(impl, mode)] = (out.loss.detach(), out.selected)
    return {
        "tp_rank": tp_rank,
        "dp_rank": dp_rank,
        "dp_size": ps.get_data_parallel_world_size(),
        "dp": dp_results,
    }


def _check_data_parallel(results):
    from megatron_slm.ops.selective_loss_reference import (
        num_to_keep,
        random_scores,
        reference_select,
    )

    dp_size = results[0]["dp_size"]
    by_dp = {}
    for r in results:
        by_dp.setdefault(r["dp_rank"], r)  # TP peers must agree; checked below
    for r in results:
        for key, (_loss, sel) in r["dp"].items():
            assert torch.equal(sel, by_dp[r["dp_rank"]]["dp"][key][1])
    for key in results[0]["dp"]:
        mode = key[1]
        scores, eligible, uns, sels = [], [], [], []
        for d in range(dp_size):
            _, target, ref, mask = _data(d)
            loss, sel = by_dp[d]["dp"][key]
            valid = mask.bool()
            if mode == "excess":
                scores.append((loss - ref).reshape(-1))
                eligible.append((valid & torch.isfinite(ref)).reshape(-1))
                uns.append((valid & ~torch.isfinite(ref)).reshape(-1))
            else:
                scores.append(random_scores((S, B), 9, d).reshape(-1))
                eligible.append(valid.reshape(-1))
                uns.append(torch.zeros(S * B, dtype=torch.bool))
            sels.append(sel.reshape(-1))
        el = torch.cat(eligible)
        k = num_to_keep(RATIO, int(el.sum()))
        expect = torch.tensor(reference_select(torch.cat(scores), el, k)) | torch.cat(uns)
        assert torch.equal(torch.cat(sels), expect), key
        assert int((torch.cat(sels) & el).sum()) == k


@pytest.mark.slow
@pytest.mark.parametrize("world_size,tp", [(2, 1), (2, 2), (4, 4)], ids=["tp1dp2", "tp2", "tp4"])
def test_selective_loss_distributed(world_size, tp):
    results = run_distributed(_worker, world_size, tp)
    assert sorted(r["tp_rank"] for r in results) == sorted(list(range(tp)) * (world_size // tp))
    _check_data_parallel(results)
