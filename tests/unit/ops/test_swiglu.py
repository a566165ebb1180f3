"""The fused SwiGLU's C++ kernels (ops.swiglu) against megatron-core's expression in float64.

Tolerances follow the project's rule: at most twice the error of the same computation done the
unfused way (``swiglu_reference``) in the same precision, against float64. The CUDA kernels are
held to these C++ kernels on the CPU harness (tests/unit/cuda/test_swiglu_cuda_host.py) and to
float64 on a GPU (tests/gpu/test_swiglu_cuda.py).
"""

from __future__ import annotations

import pytest
import torch

from megatron_slm.ops import swiglu as sw

pytestmark = pytest.mark.skipif(
    not sw.has_swiglu_kernels(torch.device("cpu")), reason="megatron_slm._C not built"
)


def fused(x):
    return sw.swiglu(x, impl="fused")  # the C++ kernels (on CPU, impl="auto" is the reference)


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    dy = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(dtype)
    return x, dy


def value_and_grad(fn, x, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(dy)
    return y.detach(), x.grad


def check_against_float64(x, dy):
    exact_y, exact_dx = value_and_grad(sw.swiglu_reference, x.double(), dy.double())
    fused_y, fused_dx = value_and_grad(fused, x, dy)
    plain_y, plain_dx = value_and_grad(sw.swiglu_reference, x, dy)
    assert fused_y.dtype == x.dtype and fused_dx.dtype == x.dtype
    for got, plain, exact in ((fused_y, plain_y, exact_y), (fused_dx, plain_dx, exact_dx)):
        tol = 2 * (plain.double() - exact).abs().max().item()
        err = (got.double() - exact).abs().max().item()
        assert err <= tol, (x.dtype, err, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 3, 64), (7, 22), (1, 2)], ids=["sbh", "odd", "one"])
def test_matches_float64_within_the_unfused_error(dtype, shape):
    check_against_float64(*inputs(shape, dtype))


def test_special_values_follow_torch():
    # silu(-inf) = -inf * sigmoid(-inf) = NaN in torch; +inf stays inf; NaN propagates; zeros.
    a = torch.tensor([[-float("inf"), float("inf"), float("nan"), 0.0, -0.0, -200.0, 200.0]])
    b = torch.tensor([[1.0, 2.0, 1.0, 5.0, 1.0, 1.0, 0.5]])
    x = torch.cat([a, b], dim=-1)
    torch.testing.assert_close(fused(x), sw.swiglu_reference(x), equal_nan=True)


def test_empty_and_non_contiguous_inputs():
    assert fused(torch.empty(0, 8)).shape == (0, 4)
    x, dy = inputs((6, 10), torch.float32)
    strided = x.t().contiguous().t()  # same values, not contiguous
    assert not strided.is_contiguous()
    torch.testing.assert_close(fused(strided), sw.swiglu_reference(x))


def test_bad_last_dimension_is_refused():
    with pytest.raises(RuntimeError, match="gate and linear halves"):
        fused(torch.randn(3, 5))


def test_fused_op_keeps_only_its_input_for_backward():
    """What the fusion saves besides passes over memory: the unfused graph keeps silu(gate)."""
    x = torch.randn(8, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused(x)
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sw.swiglu_reference(x)
    assert len(saved) > 1


def test_auto_is_fused_on_cuda_only_and_the_reference_elsewhere(monkeypatch):
    assert not sw.fused_swiglu_available(torch.device("cpu"))
    x, dy = inputs((5, 12), torch.float32)
    y, dx = value_and_grad(sw.swiglu, x, dy)  # impl="auto" on the CPU
    ref_y, ref_dx = value_and_grad(sw.swiglu_reference, x, dy)
    assert torch.equal(y, ref_y) and torch.equal(dx, ref_dx)
    monkeypatch.setattr(sw, "has_swiglu_kernels", lambda device: False)  # no _C, or no CUDA
    assert not sw.fused_swiglu_available(torch.device("cuda"))
    with pytest.raises(RuntimeError, match="no SwiGLU kernels"):
        fused(x)
    with pytest.raises(ValueError, match="impl must be"):
        sw.swiglu(x, impl="triton")


def test_float64_is_computed_in_float64():
    x, dy = inputs((6, 20), torch.float64)
    y, dx = value_and_grad(fused, x, dy)
    ref_y, ref_dx = value_and_grad(sw.swiglu_reference, x, dy)
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-12, atol=1e-12)


def test_a_double_backward_raises_instead_of_a_wrong_gradient():
    x = torch.randn(4, 8, requires_grad=True)
    (g,) = torch.autograd.grad(fused(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), x)
