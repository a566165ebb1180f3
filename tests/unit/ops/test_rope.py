"""The fused RoPE's C++ kernel (ops.rope) against megatron-core's RoPE, in float64.

``rope_reference`` is held to megatron-core's own ``_apply_rotary_pos_emb_bshd`` bit for bit. The
kernel follows the project's rule: at most twice the error of the unfused computation in the same
precision, against float64. The CUDA kernel is held to this C++ kernel on the CPU harness
(tests/unit/cuda/test_rope_cuda_host.py) and to float64 on a GPU (tests/gpu/test_rope_cuda.py).
"""

from __future__ import annotations

import functools

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from megatron_slm.ops import rope as rp

pytestmark = pytest.mark.skipif(
    not rp.has_rope_kernels(torch.device("cpu")), reason="megatron_slm._C not built"
)


def fused(t, freqs):
    return rp.apply_rope(t, freqs, impl="fused")  # the C++ kernel, or an error


def rope_freqs(s, d, base=10000.0, rot=None):
    """megatron-core's ``RotaryEmbedding`` layout: fp32 ``[s, 1, 1, rot]``, the angles twice."""
    rot = rot or d
    inv = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    f = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    return torch.cat([f, f], dim=-1)[:, None, None, :]


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * 3).to(dtype)
    return t, torch.randn(shape, generator=g).to(dtype)


def value_and_grad(fn, t, dy, freqs):
    t = t.detach().clone().requires_grad_()
    y = fn(t, freqs)
    y.backward(dy)
    return y.detach(), t.grad


def check_against_float64(t, dy, freqs):
    exact = value_and_grad(rp.rope_reference, t.double(), dy.double(), freqs.double())
    got = value_and_grad(fused, t, dy, freqs)
    plain = value_and_grad(rp.rope_reference, t, dy, freqs)
    assert got[0].dtype == t.dtype and got[1].dtype == t.dtype and got[0].is_contiguous()
    for g, p, e in zip(got, plain, exact):
        tol = 2 * (p.double() - e).abs().max().item()
        err = (g.double() - e).abs().max().item()
        assert err <= tol, (t.dtype, err, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_is_megatron_cores_rope_bit_for_bit(dtype):
    t, dy = inputs((9, 2, 3, 16), dtype)
    for rot in (16, 8):  # the whole head, and megatron-core's rotary_percent < 1 (a pass-through)
        freqs = rope_freqs(9, 16, rot=rot)
        ours = value_and_grad(rp.rope_reference, t, dy, freqs)
        megatron = value_and_grad(_apply_rotary_pos_emb_bshd, t, dy, freqs)
        for a, b in zip(ours, megatron):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape", [(37, 2, 4, 64), (5, 1, 3, 6), (1, 1, 1, 2)], ids=["sbhd", "small-d", "one"]
)
def test_matches_float64_within_the_unfused_error(dtype, shape):
    t, dy = inputs(shape, dtype)
    # positions up to 4096: large angles, where a fast sin/cos would lose digits
    freqs = rope_freqs(shape[0], shape[3]) * (4096 / max(shape[0], 1))
    freqs[..., shape[3] // 2 :] += 0.5  # halves of different angles: each half's table read right
    check_against_float64(t, dy, freqs)


def test_strided_key_of_the_qkv_projection_is_read_in_place():
    """The key is a strided view of megatron-core's ``[s, b, groups, (r + 2) * d]`` projection:
    rotated without a copy, its gradient reaching the projection's output where autograd puts it."""
    s, b, groups, r, d = 11, 2, 2, 2, 16
    mixed = torch.randn(s, b, groups, (r + 2) * d, requires_grad=True)
    _, key, _ = torch.split(mixed, [r * d, d, d], dim=3)
    assert not key.is_contiguous() and key.stride(1) == groups * key.stride(2)
    freqs = rope_freqs(s, d)
    dy = torch.randn(s, b, groups, d)
    (got,) = torch.autograd.grad(fused(key, freqs), mixed, dy)
    (want,) = torch.autograd.grad(rp.rope_reference(key, freqs), mixed, dy)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # rows of no single stride (a transposed view): copied first, same values
    odd = torch.randn(b, s, groups, d).transpose(0, 1)
    torch.testing.assert_close(fused(odd, freqs), rp.rope_reference(odd, freqs))
    assert "aten::copy_" not in aten_calls(lambda: fused(key, freqs))  # the key: in place
    assert "aten::copy_" in aten_calls(lambda: fused(odd, freqs))  # the check can see a copy


def aten_calls(fn) -> set[str]:
    """Names of the operators ``fn`` dispatches (the C++ glue's reshape, copy, empty)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_tables_are_computed_once_per_freqs_memory():
    freqs = rope_freqs(7, 8)
    first = rp._tables(freqs)
    assert rp._tables(freqs)[0] is first[0]  # the layers of a model share one pair
    # activation recompute hands each layer a detached tensor of the same memory: a hit
    assert rp._tables(freqs.detach())[0] is first[0]
    assert rp._tables(freqs.clone())[0] is not first[0]  # other memory: a miss
    freqs.detach().mul_(2)  # an in-place change (through a view: one version counter) misses
    cos, sin = rp._tables(freqs)
    assert cos is not first[0]
    torch.testing.assert_close(cos, torch.cos(freqs.reshape(7, 8)))
    torch.testing.assert_close(sin, torch.sin(freqs.reshape(7, 8)))


def test_inference_mode_freqs_and_tables_serve_a_later_training_step():
    """The scorer runs in inference mode: its ``rotary_pos_emb`` (megatron-core caches it per
    length) has no version counter, and tables made then must still be savable for a backward."""
    with torch.inference_mode():
        freqs = rope_freqs(6, 8)
        t = torch.randn(6, 1, 2, 8)
        assert torch.equal(fused(t, freqs), fused(t.clone(), freqs))
    assert rp._tables(freqs)[0] is rp._tables(freqs)[0] and not rp._tables(freqs)[0].is_inference()
    t, dy = inputs((6, 1, 2, 8), torch.float32)
    got = value_and_grad(fused, t, dy, freqs)  # the inference-mode tensor's tables, saved
    want = value_and_grad(rp.rope_reference, t.double(), dy.double(), freqs.double())
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-5, atol=1e-5)


def test_auto_is_the_kernel_where_it_applies_and_the_reference_elsewhere(monkeypatch):
    t, dy = inputs((6, 2, 2, 8), torch.float32)
    freqs = rope_freqs(6, 8)
    kernel = value_and_grad(fused, t, dy, freqs)
    reference = value_and_grad(rp.rope_reference, t, dy, freqs)
    assert not torch.equal(kernel[0], reference[0])  # fp32 tables vs megatron-core's rounding
    for impl, want in (("auto", kernel), ("torch", reference)):
        got = value_and_grad(functools.partial(rp.apply_rope, impl=impl), t, dy, freqs)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), impl
    partial = rope_freqs(6, 8, rot=4)  # a partial rotation: the reference's job
    assert torch.equal(rp.apply_rope(t, partial), rp.rope_reference(t, partial))
    with pytest.raises(ValueError, match="fused kernel takes"):
        fused(t, partial)
    assert torch.equal(rp.apply_rope(t.double(), freqs), rp.rope_reference(t.double(), freqs))
    learned = freqs.clone().requires_grad_()  # angles with a gradient: the reference carries it
    assert not rp.fused_rope_applies(t, learned) and rp.apply_rope(t, learned).requires_grad
    assert not rp.fused_rope_applies(torch.empty(6, 2, 2, 0), torch.empty(6, 1, 1, 0))
    with pytest.raises(ValueError, match="impl must be"):
        rp.apply_rope(t, freqs, impl="triton")
    monkeypatch.setattr(rp, "has_rope_kernels", lambda device: False)  # no _C, or no CUDA
    assert torch.equal(rp.apply_rope(t, freqs), reference[0])
    with pytest.raises(RuntimeError, match="no RoPE kernel"):
        fused(t, freqs)


def test_fused_op_keeps_only_the_tables_for_backward():
    t = torch.randn(5, 1, 2, 8, requires_grad=True)
    freqs = rope_freqs(5, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        fused(t, freqs)
    assert [tuple(x.shape) for x in saved] == [(5, 8), (5, 8)]


def test_empty_input_and_double_backward():
    assert fused(torch.empty(0, 2, 2, 8), rope_freqs(0, 8)).shape == (0, 2, 2, 8)
    t = torch.randn(4, 1, 1, 8, requires_grad=True)
    (g,) = torch.autograd.grad(fused(t, rope_freqs(4, 8)).sum(), t, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), t)
