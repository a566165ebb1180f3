"""The fused RoPE's CUDA kernel on a GPU: within twice the error of megatron-core's unfused RoPE in
the same dtype against float64 (values and gradients; vector and one-pair paths, the key read in
place from the QKV projection), and free of host syncs (skipped without CUDA, like every test in
tests/gpu; the torch spec's layers run it in tests/gpu/test_train_step_syncs.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_slm import _extension
from megatron_slm.ops import rope as rp
from tests.unit.ops.test_rope import inputs, rope_freqs, value_and_grad

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _extension.HAS_CUDA_KERNELS, reason="megatron_slm._C built without CUDA kernels"
    ),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2048, 2, 32, 64), (7, 1, 3, 6)], ids=["tinyllama-q", "small"])
def test_matches_float64_within_the_unfused_error(dtype, shape):
    t, dy = inputs(shape, dtype)
    freqs = rope_freqs(shape[0], shape[3])
    freqs[..., shape[3] // 2 :] += 0.5  # halves of different angles
    assert rp.has_rope_kernels(torch.device("cuda"))  # impl="auto" is the fused op here
    exact = value_and_grad(rp.rope_reference, t.double(), dy.double(), freqs.double())
    got = value_and_grad(rp.apply_rope, t.cuda(), dy.cuda(), freqs.cuda())
    plain = value_and_grad(rp.rope_reference, t.cuda(), dy.cuda(), freqs.cuda())
    for g, e, p in zip(got, exact, plain):
        tol = 2 * (p.cpu().double() - e).abs().max().item()
        assert (g.cpu().double() - e).abs().max().item() <= tol


def test_strided_key_and_misaligned_rows():
    s, b, groups, d = 64, 2, 4, 64
    mixed = torch.randn(s, b, groups, 6 * d, device="cuda", dtype=torch.bfloat16)
    key = torch.split(mixed, [4 * d, d, d], dim=3)[1]  # rows of one stride, read in place
    freqs = rope_freqs(s, d).cuda()
    exact = rp.rope_reference(key.double(), freqs.double())
    plain = rp.rope_reference(key, freqs)
    tol = 2 * (plain.double() - exact).abs().max().item()
    assert (rp.apply_rope(key, freqs).double() - exact).abs().max().item() <= tol
    buf = torch.empty(key.numel() + 1, dtype=key.dtype, device="cuda")
    shifted = buf[1:].view(key.shape).copy_(key)  # 2 bytes past a 16-byte boundary: one pair each
    torch.testing.assert_close(rp.apply_rope(shifted, freqs), rp.apply_rope(key, freqs))


def test_forward_and_backward_are_sync_free(no_host_sync):
    t, dy = inputs((512, 2, 8, 64), torch.bfloat16)
    t, dy = t.cuda().requires_grad_(), dy.cuda()
    freqs = rope_freqs(512, 64).cuda()
    rp.apply_rope(t, freqs).backward(dy)  # warm-up: allocations and the tables
    t.grad = None
    torch.cuda.synchronize()
    with no_host_sync():
        rp.apply_rope(t, freqs).backward(dy)
    assert t.grad is not None and t.grad.shape == t.shape
