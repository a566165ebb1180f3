"""The CUDA kernel of csrc/cuda/rope.cu, run unchanged on the CPU by the harness: NaN and
infinities where the C++ kernel of megatron_slm._C has them, other values within twice the error of
megatron-core's unfused RoPE in the same dtype against float64 (the C++ kernel is held to the same
in tests/unit/ops/test_rope.py), the same bits in every thread order; on the vector path (16-byte
aligned rows, half the head a whole number of vectors), the one-pair path (small heads, misaligned
buffers) and strided rows (the key of the QKV projection, read in place); one launch per call, and
a grid capped at one block gives the same bits (grid-stride loop). Under ASan/UBSan in
tests/unit/cuda/test_sanitizers.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_slm import _extension
from megatron_slm.ops.rope import rope_reference
from tests.unit.cuda import harness as H
from tests.unit.cuda.test_swiglu_cuda_host import assert_as_accurate, same_for_all_orders
from tests.unit.ops.test_rope import rope_freqs

pytestmark = [
    pytest.mark.skipif(not H.have_compiler(), reason="needs a C++ compiler"),
    pytest.mark.skipif(
        not _extension.HAS_C or not hasattr(_extension._C, "rope"),
        reason="megatron_slm._C not built",
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e4, -1e4]


@pytest.fixture(scope="module")
def exe():
    return H.build()


def rope_inputs(s, b, n, d, dtype, strided=False, seed=0):
    """x [s, b, n, d] (with ``strided``: the key view of a [s, b, n, 3 d] projection), the
    output gradient, freqs and their fp32 tables."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(s, b, n, 3 * d if strided else d, generator=g) * 3
    base.view(-1)[: len(SPECIAL)] = torch.tensor(SPECIAL)  # the first head of position 0
    x = base.to(dtype)[..., d : 2 * d] if strided else base.to(dtype)
    dy = torch.randn(s, b, n, d, generator=g).to(dtype)
    freqs = rope_freqs(s, d) * 37.0  # large angles: positions up to ~37 s
    freqs[..., d // 2 :] += 0.5  # halves of different angles: each half's table is read right
    f = freqs.reshape(s, d)
    return x, dy, freqs, torch.cos(f), torch.sin(f)


def check(exe, x, dy, freqs, cos, sin, misalign=0, issued=None):
    y = same_for_all_orders(H.rope(exe, x, cos, sin, misalign=misalign, issued=issued))
    dx = same_for_all_orders(H.rope(exe, dy, cos, sin, backward=True, misalign=misalign))
    exact_x = x.detach().double().requires_grad_()
    exact_y = rope_reference(exact_x, freqs.double())
    (exact_dx,) = torch.autograd.grad(exact_y, exact_x, dy.double())
    plain_x = x.detach().clone().requires_grad_()
    plain_y = rope_reference(plain_x, freqs)
    (plain_dx,) = torch.autograd.grad(plain_y, plain_x, dy)
    assert_as_accurate(y, _extension._C.rope(x, cos, sin, False), exact_y.detach(), plain_y)
    assert_as_accurate(dx, _extension._C.rope(dy, cos, sin, True), exact_dx, plain_dx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, strided, misalign",
    [
        ((5, 2, 3, 64), False, 0),
        ((4, 2, 2, 64), True, 0),
        ((3, 2, 3, 6), False, 0),
        ((4, 1, 2, 32), False, 2),
    ],
    ids=["vectors", "strided-key", "one-pair", "misaligned"],
)
def test_kernel_matches_the_cpp_kernel(exe, dtype, shape, strided, misalign):
    x, dy, freqs, cos, sin = rope_inputs(*shape, dtype, strided=strided)
    misalign = misalign if dtype != torch.float32 else 2 * misalign
    issued = {}
    check(exe, x, dy, freqs, cos, sin, misalign=misalign, issued=issued)
    # one launch, no memset, as many 256-thread blocks as the expected path has items: a thread
    # per 16-byte vector of each half where the rows are aligned and hold whole vectors, else per
    # pair (the shapes are chosen so that the two paths' grids differ, or both are one block)
    rows, d = x.numel() // x.shape[3], x.shape[3]
    vec = 16 // x.element_size() if (d // 2) % (16 // x.element_size()) == 0 and not misalign else 1
    assert set(issued.values()) == {(1, 0, -(-rows * d // 2 // vec // 256))}, issued


def test_a_capped_grid_still_covers_every_row(exe):
    # 16 x 4 x 8 rows x 8 vectors = 4096 items: 16 blocks of 256 threads, or 1 looping 16 times
    x, dy, _, cos, sin = rope_inputs(16, 4, 8, 128, torch.bfloat16)
    for backward in (False, True):
        src = dy if backward else x
        capped = H.rope(exe, src, cos, sin, backward, orders=("forward",), max_grid=1)
        full = H.rope(exe, src, cos, sin, backward, orders=("forward",))
        assert torch.equal(capped["forward"].view(torch.int16), full["forward"].view(torch.int16))


def test_empty_input_launches_nothing(exe):
    issued = {}
    x = torch.empty(0, 2, 2, 8)
    out = H.rope(exe, x, torch.empty(0, 8), torch.empty(0, 8), orders=("forward",), issued=issued)
    assert out["forward"].shape == x.shape and issued == {"forward": (0, 0, 0)}
