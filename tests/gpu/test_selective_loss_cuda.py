"""CUDA kernels of selective_cross_entropy on a GPU (needs _C built with CUDA; skipped elsewhere
by tests/conftest.py). The same kernels run on the CPU in every CI run through the harness of
csrc/cuda/testing (tests/unit/cuda); here they run for real, against the same float64 reference
checks (tests/unit/cuda/kernel_checks.py, with the error bound of the device's __expf)."""

from __future__ import annotations

import pytest
import torch

from megatron_slm import _extension
from megatron_slm.ops import selective_cross_entropy, selective_loss_mean
from megatron_slm.ops.selective_loss_reference import (
    num_to_keep,
    reference_select,
    reference_selective_cross_entropy,
    torch_select,
)
from tests.unit.cuda import kernel_checks as K

pytestmark = pytest.mark.gpu

needs_kernels = pytest.mark.skipif(
    not _extension.HAS_CUDA_KERNELS, reason="megatron_slm._C built without CUDA kernels"
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(s, b, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, v, generator=g) * 3
    target = torch.randint(0, v, (s, b), generator=g)
    ref = torch.rand(s, b, generator=g) * 5
    ref[0] = float("nan")
    mask = torch.ones(s, b)
    mask[-3:, 0] = 0
    return logits.to(dtype).cuda(), target.cuda(), ref.cuda(), mask.cuda()


def _on_gpu(x: torch.Tensor, misaligned: bool) -> torch.Tensor:
    """x on the GPU, its data one element past a 16-byte boundary when `misaligned`."""
    if not misaligned:
        return x.cuda()
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    out = buf[1:].view(x.shape)
    out.copy_(x)
    assert out.data_ptr() % 16 != 0
    return out


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [32000, 1001])  # vectorized and scalar paths
@pytest.mark.parametrize("scope", ["microbatch", "sequence"])
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_matches_reference(no_host_sync, dtype, v, scope, inplace):
    logits, target, ref, mask = _inputs(64, 4, v, dtype)

    def call():
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
        return x, out

    call()  # one-time lazy set-up outside the guard (test_selective_loss_sync_free.py)
    with no_host_sync():  # the op itself never waits for the device
        x, out = call()
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
    assert 0 < int(out.selected.sum()) < out.selected.numel()  # a real selection
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad.float(), xr.grad.to(dtype).float(), rtol=tol, atol=1e-5)
    assert torch.all(x.grad[~out.selected] == 0)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [8, 1000, 1001, 32000])
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("vocab_start", [0, 3000])
def test_fwd_stats_kernel(dtype, v, misaligned, vocab_start):
    """Shard offsets (targets below/above the shard), misaligned rows, NaN / -inf / all -inf /
    +inf rows."""
    x = K.logits(12, v, dtype, seed=v)
    t = K.targets(12, v, vocab_start, seed=v)
    st = _extension._C.selective_loss_fwd_stats(_on_gpu(x, misaligned), t.cuda(), vocab_start)
    K.check_stats(st, x, t, vocab_start, "cuda", fast_exp=True)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [8, 1000, 1001, 32000])
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("vocab_start", [0, 3000])
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_kernel(dtype, v, misaligned, vocab_start, inplace):
    x = K.logits(12, v, dtype, seed=v + 7)
    t = K.targets(12, v, vocab_start, seed=v + 7)
    lse = torch.logsumexp(x.double(), dim=1).float()
    lse[0] = lse[0] + 0.5  # an lse from other shards (tensor parallel)
    scale = torch.rand(12, generator=torch.Generator().manual_seed(5)) * 2 - 0.5
    scale[[2, 9]] = 0.0  # zero rows: zero-filled, logits not read
    xg = _on_gpu(x, misaligned)
    gr = _extension._C.selective_loss_backward(
        xg, t.cuda(), vocab_start, lse.cuda(), scale.cuda(), inplace
    )
    assert (gr.data_ptr() == xg.data_ptr()) == inplace
    K.check_grad(gr, x, t, vocab_start, lse, scale, "cuda", fast_exp=True)


@needs_kernels
@pytest.mark.parametrize("n", [1, 17, 1000, 100_000])  # 100_000: 13 blocks per group
def test_select_kernel(n):
    """Ties, negatives, ±0, ±inf, NaN; k = 1, k = #eligible, k = 0, k > #eligible."""
    scores, eligible = K.select_inputs(6, n, seed=n)
    m = eligible.sum(dim=1)
    k = torch.tensor([1, int(m[1]), max(1, int(m[2]) // 3), 0, int(m[4]) + 5, 2])
    got = _extension._C.selective_loss_select(scores.cuda(), eligible.cuda(), k.cuda()).cpu()
    assert torch.equal(got, torch_select(scores, eligible, k))
    for i in range(6):
        assert got[i].tolist() == reference_select(scores[i], eligible[i], int(k[i])), i


@needs_kernels
@pytest.mark.parametrize("ratio", [0.6, 0.5, 0.001])
@pytest.mark.parametrize("n", [5000, 100_000])  # one block per group; several
def test_select_kernel_derives_k(ratio, n):
    """No k: each group's k from the ratio and its eligible count, computed on the device."""
    scores, eligible = K.select_inputs(3, n, seed=3)
    eligible[1] = False
    got = _extension._C.selective_loss_select(scores.cuda(), eligible.cuda(), None, ratio).cpu()
    for i in range(3):
        k = num_to_keep(ratio, int(eligible[i].sum()))
        assert got[i].tolist() == reference_select(scores[i], eligible[i], k), i


@needs_kernels
def test_select_kernel_ties_across_blocks():
    n = 3 * 8192 + 77
    scores = torch.full((1, n), 7.0)
    scores[0, ::3] = 9.0
    eligible = torch.ones(1, n, dtype=torch.bool)
    k = torch.tensor([int((scores > 7).sum()) + 2 * 8192])  # the k-th 7.0 is in the third block
    got = _extension._C.selective_loss_select(scores.cuda(), eligible.cuda(), k.cuda()).cpu()
    assert got[0].tolist() == reference_select(scores[0], eligible[0], int(k[0]))


@needs_kernels
def test_binding_refuses_host_tensors():
    x = torch.randn(4, 8, device="cuda")
    t = torch.zeros(4, dtype=torch.int64, device="cuda")
    lse, scale = torch.zeros(4, device="cuda"), torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError, match="device"):
        _extension._C.selective_loss_backward(x, t, 0, lse.cpu(), scale, False)
    with pytest.raises(RuntimeError, match="device"):
        _extension._C.selective_loss_select(x, (x > 0).cpu(), torch.ones(4, dtype=torch.int64))
