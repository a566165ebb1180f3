"""The CUDA kernels of csrc/cuda/swiglu.cu, run unchanged on the CPU by the harness: NaN and
infinities where the C++ kernels of megatron_slm._C have them, other values within twice the
error of megatron-core's unfused expression in the same dtype against float64 (the C++ kernels are
held to the same in tests/unit/ops/test_swiglu.py; bits differ where a compiler contracts a
multiply-add), the same bits in every thread order, on the vector path (16-byte aligned, f a whole
number of vectors) and the one-value path (odd f, misaligned buffers); one launch per call, and a
grid capped at one block gives the same bits (grid-stride loop). Under ASan/UBSan in
tests/unit/cuda/test_sanitizers.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_slm import _extension
from megatron_slm.ops.swiglu import swiglu_reference
from tests.unit.cuda import harness as H
from tests.unit.ops.test_swiglu import value_and_grad

pytestmark = [
    pytest.mark.skipif(not H.have_compiler(), reason="needs a C++ compiler"),
    pytest.mark.skipif(
        not _extension.HAS_C or not hasattr(_extension._C, "swiglu_forward"),
        reason="megatron_slm._C not built",
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 30.0, -30.0]


@pytest.fixture(scope="module")
def exe():
    return H.build()


def swiglu_inputs(rows, f, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 2 * f, generator=g) * 4
    x.view(-1)[: len(SPECIAL)] = torch.tensor(SPECIAL)  # gate values of row 0
    x.view(-1)[f : f + len(SPECIAL)] = torch.tensor(SPECIAL[::-1])  # and its linear values
    return x.to(dtype), torch.randn(rows, f, generator=g).to(dtype)


def assert_as_accurate(got, want_special, exact, plain):
    """NaN and infinities where the C++ kernel has them; elsewhere within twice the error of
    megatron-core's unfused expression in the same dtype, against float64 (the project's rule)."""
    assert torch.equal(got.isnan(), want_special.isnan())
    assert torch.equal(got.isinf(), want_special.isinf())
    assert torch.equal(got[got.isinf()], want_special[want_special.isinf()])
    ok = exact.isfinite() & got.isfinite()
    tol = 2 * (plain.double() - exact)[ok].abs().max()
    assert (got.double() - exact)[ok].abs().max() <= tol


def same_for_all_orders(outs):
    first = outs[H.ORDERS[0]]
    for o in H.ORDERS[1:]:
        assert torch.equal(outs[o].view(torch.uint8), first.view(torch.uint8)), o
    return first


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows, f, misalign",
    [(6, 64, 0), (5, 13, 0), (4, 32, 2)],
    ids=["vectors", "odd-f", "misaligned"],
)
def test_kernels_match_the_cpp_kernels(exe, dtype, rows, f, misalign):
    x, dy = swiglu_inputs(rows, f, dtype)
    misalign = misalign if dtype != torch.float32 else 2 * misalign
    issued = {}
    y = same_for_all_orders(H.swiglu(exe, x, misalign=misalign, issued=issued))
    assert set(issued.values()) == {(1, 0)}  # one launch, no memset
    dx = same_for_all_orders(H.swiglu(exe, x, dy, misalign=misalign))
    exact_y, exact_dx = value_and_grad(swiglu_reference, x.double(), dy.double())
    plain_y, plain_dx = value_and_grad(swiglu_reference, x, dy)
    assert_as_accurate(y, _extension._C.swiglu_forward(x), exact_y, plain_y)
    assert_as_accurate(dx, _extension._C.swiglu_backward(dy, x), exact_dx, plain_dx)


def test_a_capped_grid_still_covers_every_row(exe):
    # 40 rows x 128 vectors = 5120 items: 20 blocks of 256 threads, or 1 block looping 20 times
    x, dy = swiglu_inputs(40, 1024, torch.bfloat16)
    for grad in (None, dy):
        capped = H.swiglu(exe, x, grad, orders=("forward",), max_grid=1)["forward"]
        full = H.swiglu(exe, x, grad, orders=("forward",))["forward"]
        assert torch.equal(capped.view(torch.int16), full.view(torch.int16))


def test_empty_input_launches_nothing(exe):
    issued = {}
    out = H.swiglu(exe, torch.empty(0, 8), orders=("forward",), issued=issued)
    assert out["forward"].numel() == 0 and issued == {"forward": (0, 0)}
