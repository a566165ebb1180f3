"""CUDA kernels of selective_cross_entropy against the reference (needs a GPU and _C built
with CUDA; skipped elsewhere by tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_slm import _extension
from megatron_slm.ops import selective_cross_entropy, selective_loss_mean
from megatron_slm.ops.selective_loss_reference import (
    reference_select,
    reference_selective_cross_entropy,
    reference_token_loss,
)

pytestmark = pytest.mark.gpu

needs_kernels = pytest.mark.skipif(
    not _extension.HAS_CUDA_KERNELS, reason="megatron_slm._C built without CUDA kernels"
)


def _inputs(s, b, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, v, generator=g) * 3
    target = torch.randint(0, v, (s, b), generator=g)
    ref = torch.rand(s, b, generator=g) * 5
    ref[0] = float("nan")
    mask = torch.ones(s, b)
    mask[-3:, 0] = 0
    return logits.to(dtype).cuda(), target.cuda(), ref.cuda(), mask.cuda()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [32000, 1001])  # vectorized and scalar paths
@pytest.mark.parametrize("scope", ["microbatch", "sequence"])
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_matches_reference(dtype, v, scope, inplace):
    logits, target, ref, mask = _inputs(64, 4, v, dtype)
    x = logits.clone().requires_grad_()
    out = selective_cross_entropy(
        x * 1.0,
        target,
        ref_loss=ref,
        loss_mask=mask,
        ratio=0.6,
        scope=scope,
        impl="cuda",
        inplace_backward=inplace,
    )
    selective_loss_mean(out).backward()
    xr = logits.float().clone().requires_grad_()
    lr, sr = reference_selective_cross_entropy(
        xr, target, ref_loss=ref, loss_mask=mask, ratio=0.6, scope=scope, selected=out.selected
    )
    ((lr * sr).sum() / sr.sum()).backward()
    cpu_sel = selective_cross_entropy(
        logits.cpu(),
        target.cpu(),
        ref_loss=ref.cpu(),
        loss_mask=mask.cpu(),
        ratio=0.6,
        scope=scope,
        impl="torch",
    ).selected
    torch.testing.assert_close(out.loss, lr.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.selected.cpu(), cpu_sel)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad.float(), xr.grad.to(dtype).float(), rtol=tol, atol=1e-5)
    assert torch.all(x.grad[~out.selected] == 0)
    truth = reference_token_loss(logits.float(), target)
    assert torch.isfinite(truth).all()


@needs_kernels
def test_cuda_select_exact_with_ties():
    g = torch.Generator().manual_seed(3)
    for n in (1, 17, 1000, 100_000):
        scores = torch.randint(0, 50, (3, n), generator=g).float()
        scores[:, ::7] = float("nan")
        eligible = torch.rand(3, n, generator=g) < 0.9
        k = torch.tensor([0, max(1, n // 3), n + 5])
        got = _extension._C.selective_loss_select(scores.cuda(), eligible.cuda(), k.cuda()).cpu()
        for i in range(3):
            assert got[i].tolist() == reference_select(scores[i], eligible[i], int(k[i]))
