"""The fused SwiGLU's CUDA kernels on a GPU: within twice the error of megatron-core's unfused
expression in the same dtype against float64 (values and gradients; vector and one-value paths),
and free of host syncs (skipped without CUDA, like every test in tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from megatron_slm import _extension
from megatron_slm.ops import swiglu as sw
from tests.unit.ops.test_swiglu import inputs, value_and_grad

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _extension.HAS_CUDA_KERNELS, reason="megatron_slm._C built without CUDA kernels"
    ),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(512, 2, 11264), (7, 26)], ids=["tinyllama-ffn", "odd"])
def test_matches_float64_within_the_unfused_error(dtype, shape):
    x, dy = inputs(shape, dtype)
    assert sw.fused_swiglu_available(torch.device("cuda"))  # impl="auto" is the fused op here
    exact_y, exact_dx = value_and_grad(sw.swiglu_reference, x.double(), dy.double())
    for got, exact, plain in zip(
        value_and_grad(sw.swiglu, x.cuda(), dy.cuda()),
        (exact_y, exact_dx),
        value_and_grad(sw.swiglu_reference, x.cuda(), dy.cuda()),
    ):
        tol = 2 * (plain.cpu().double() - exact).abs().max().item()
        assert (got.cpu().double() - exact).abs().max().item() <= tol


def test_misaligned_input_takes_the_one_value_path():
    x, _ = inputs((9, 64), torch.bfloat16)
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    view = buf[1:].view_as(x).copy_(x)  # 2 bytes past a 16-byte boundary
    aligned = x.cuda()  # the vector path: the same formula, so the same values
    torch.testing.assert_close(sw.swiglu(view), sw.swiglu(aligned))


def test_forward_and_backward_are_sync_free(no_host_sync):
    x, dy = inputs((64, 4, 512), torch.bfloat16)
    x, dy = x.cuda().requires_grad_(), dy.cuda()
    sw.swiglu(x).backward(dy)  # warm-up: allocations
    x.grad = None
    torch.cuda.synchronize()
    with no_host_sync():
        sw.swiglu(x).backward(dy)
    assert x.grad is not None and x.grad.shape == x.shape
