"""The CUDA kernels of csrc/cuda/selective_loss.cu, run unchanged on the CPU by the harness of
csrc/cuda/testing/, against the C++ CPU kernels (megatron_slm._C) and the pure-PyTorch
reference, for every thread order of the harness (outputs must not depend on it).

Tolerances (derived in kernel_checks.py): maxima and target logits exact, sums within the
recursive-summation bound, gradients within 2 ulp of the dtype, selections exact.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_slm import _extension
from megatron_slm.ops.selective_loss_reference import (
    FINALIZE_KEEP_UNSCORED,
    FINALIZE_RANK_EXCESS,
    FINALIZE_SELECT_ALL,
    num_to_keep,
    reference_select,
    torch_add_top,
    torch_backward,
    torch_finalize,
    torch_fwd_stats,
    torch_select,
)
from tests.unit.cuda import harness as H
from tests.unit.cuda import kernel_checks as K

pytestmark = pytest.mark.skipif(not H.have_compiler(), reason="needs a C++ compiler")

C = _extension._C if _extension.HAS_C else None
needs_c = pytest.mark.skipif(C is None, reason="megatron_slm._C not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN, INF = K.NAN, K.INF


@pytest.fixture(scope="module")
def exe():
    return H.build()


def _same_for_all_orders(outs):
    ref = outs[H.ORDERS[0]]
    bits = H._BITS.get(ref.dtype)
    for o in H.ORDERS[1:]:
        a, b = (ref.view(bits), outs[o].view(bits)) if bits else (ref, outs[o])
        assert torch.equal(a, b), f"output differs between thread orders forward and {o}"
    return ref


def _misalign(dtype, misaligned):
    return torch.tensor([], dtype=dtype).element_size() if misaligned else 0


# ------------------------------------------------------------------------------------------
# forward statistics
# ------------------------------------------------------------------------------------------
@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [8, 1000, 1001])
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("vocab_start", [0, 3000])
def test_fwd_stats(exe, dtype, v, misaligned, vocab_start):
    n = 12
    x = K.logits(n, v, dtype, seed=v)
    t = K.targets(n, v, vocab_start, seed=v)
    st = _same_for_all_orders(
        H.fwd_stats(exe, x, t, vocab_start, misalign=_misalign(dtype, misaligned))
    )
    K.check_stats(st, x, t, vocab_start, "cuda")
    K.check_stats(C.selective_loss_fwd_stats(x, t, vocab_start), x, t, vocab_start, "cpp")
    K.check_stats(torch_fwd_stats(x, t, vocab_start), x, t, vocab_start, "torch")


def _nan_rows(v, dtype):
    """Rows whose NaNs sit where a max can lose them: first and last entry, the last lane of a
    16-wide group, both sides of the C++ kernel's 512-entry chunks, the tail of a thread's
    vectors; with +inf, with -inf only, all NaN; one NaN row per position."""
    g = torch.Generator().manual_seed(v)
    x = torch.randn(14, v, generator=g) * 3
    for r, i in enumerate([0, v - 1, 15, 511, 512, v // 2, v - 9, v - 17]):
        x[r, i] = NAN
    x[8, [3, v - 1]] = torch.tensor([INF, NAN])
    x[9] = -INF
    x[9, [2, v - 1]] = NAN  # NaN and -inf only: the max is -inf
    x[10] = NAN
    x[11, v - 1] = NAN
    x[11, v - 2] = 50.0  # the max right before the NaN
    x[12, 0] = NAN
    x[12, 1] = 50.0  # ... right after it
    return x.to(dtype), K.targets(14, v, 0, seed=v)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [1000, 1040])
def test_nan_rows_every_statistic_agrees(exe, dtype, v):
    """One NaN rule (the max ignores NaN, the sum is NaN) in the C++, CUDA and pure-PyTorch
    kernels: the same max and target logit bits, NaN sums, and the same finalize outputs."""
    x, t = _nan_rows(v, dtype)
    x[13] = 1.0  # a plain row: its stats and finalize outputs are compared too
    t[1] = v - 1  # the target is the NaN itself
    cuda = _same_for_all_orders(H.fwd_stats(exe, x, t))
    cpp = C.selective_loss_fwd_stats(x, t, 0)
    K.check_stats(cuda, x, t, 0, "cuda")
    K.check_stats(cpp, x, t, 0, "cpp")
    pt = torch_fwd_stats(x, t, 0)
    K.check_stats(pt, x, t, 0, "torch")
    assert torch.equal(cuda[:, [0, 2]].view(torch.int32), cpp[:, [0, 2]].view(torch.int32))
    assert torch.equal(pt[:, [0, 2]].view(torch.int32), cpp[:, [0, 2]].view(torch.int32))
    assert torch.isnan(cuda[:13, 1]).all() and torch.isnan(cpp[:13, 1]).all()
    assert torch.isnan(pt[:13, 1]).all()
    assert torch.equal(cuda[13], cpp[13])  # all-equal row: sum exp(0) exact in both
    ref = torch.rand(14) * 4
    for flags in (FINALIZE_RANK_EXCESS | FINALIZE_KEEP_UNSCORED, FINALIZE_SELECT_ALL):
        a = H.finalize(exe, cuda, t, v, ref, None, flags, orders=H.ORDERS[:1])[H.ORDERS[0]]
        b = C.selective_loss_finalize(cpp, t, v, ref, None, flags)
        for i, (p, q) in enumerate(zip(a, b)):
            if p.is_floating_point():
                # Bitwise, NaN where NaN: a NaN's sign is not the rule's. Row 8's sum adds
                # inf - inf (x86's default NaN, 0xffc00000) and a NaN logit (0x7fc00000); x86
                # keeps the first operand's NaN, and which that is depends on the C++ kernel's
                # code for the build host (-march=native): an AVX2 host's build keeps the other.
                nan = torch.isnan(p)
                assert torch.equal(nan, torch.isnan(q)), i
                p, q = p[~nan], q[~nan]
            assert torch.equal(p.view(torch.uint8), q.view(torch.uint8)), i


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [8, 1000, 1001])
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("vocab_start", [0, 3000])
@pytest.mark.parametrize("inplace", [False, True])
def test_backward(exe, dtype, v, misaligned, vocab_start, inplace):
    n = 12
    x = K.logits(n, v, dtype, seed=v + 7)
    t = K.targets(n, v, vocab_start, seed=v + 7)
    xd = x.double()
    lse = torch.logsumexp(xd, dim=1).float()
    lse[0] = lse[0] + 0.5  # an lse from other shards (tensor parallel)
    g = torch.Generator().manual_seed(5)
    scale = torch.rand(n, generator=g) * 2 - 0.5
    scale[[2, 9]] = 0.0  # zero rows: zero-filled, logits not read
    off = _misalign(dtype, misaligned)
    outs = H.backward(
        exe, x, t, lse, scale, vocab_start, inplace=inplace, misalign=off, gmisalign=off
    )
    gr = _same_for_all_orders(outs)
    K.check_grad(gr, x, t, vocab_start, lse, scale, "cuda")
    gc = C.selective_loss_backward(x.clone(), t, vocab_start, lse, scale, False)
    K.check_grad(gc, x, t, vocab_start, lse, scale, "cpp")
    gt = torch_backward(x.clone(), t, vocab_start, lse, scale, False)
    K.check_grad(gt, x, t, vocab_start, lse, scale, "torch")


@needs_c
def test_backward_grad_misaligned_only(exe):
    """logits aligned, grad not: the scalar path (both pointers decide)."""
    x = K.logits(12, 1000, torch.float16, seed=1, special=False)
    t = K.targets(12, 1000, 0, seed=1)
    lse = torch.logsumexp(x.double(), dim=1).float()
    scale = torch.ones(12)
    outs = H.backward(exe, x, t, lse, scale, gmisalign=2, orders=H.ORDERS[:1])
    K.check_grad(outs[H.ORDERS[0]], x, t, 0, lse, scale, "cuda")


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_fast_exp_tolerance(exe, dtype):
    """The GPU tests' tolerance (__expf error added) on rows with -inf logits and zero scales:
    the bound must stay finite (inf ulps x ulp(0) x 0 was NaN, and `err <= NaN` failed every
    GPU backward case), and the harness's gradient must meet it."""
    n, v = 12, 1000
    x = K.logits(n, v, dtype, seed=3)  # row 3: -inf every 3rd entry, row 4 all -inf
    t = K.targets(n, v, 0, seed=3)
    lse = torch.logsumexp(x.double(), dim=1).float()
    scale = torch.linspace(-1.0, 1.0, n)
    scale[[3, 4, 6]] = 0.0  # zero rows among the -inf ones, and one with a single finite entry
    scale[8] = 0.0
    g, tol = K.grad_reference(x, t, 0, lse, scale, fast_exp=True)
    checked = ~torch.isnan(g)  # what check_grad compares (rows with NaN/+inf logits are NaN)
    assert checked[3].all() and checked[4].all()
    assert not torch.isnan(tol[checked]).any()
    gr = H.backward(exe, x, t, lse, scale, 0, orders=H.ORDERS[:1])[H.ORDERS[0]]
    K.check_grad(gr, x, t, 0, lse, scale, "cuda", fast_exp=True)
    gc = C.selective_loss_backward(x.clone(), t, 0, lse, scale, False)
    K.check_grad(gc, x, t, 0, lse, scale, "cpp", fast_exp=True)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unroll", [1, 2])
def test_row_kernels_unrolled(exe, dtype, unroll):
    """Rows long enough for the unrolled loop (several 2 x 256-vector steps, then the tail), with
    each variant of MEGATRON_SLM_ROW_UNROLL: same stats bits and gradient as the C++ kernels'
    bounds allow, in place too."""
    n, v = 8, 6000
    x = K.logits(n, v, dtype, seed=11)
    t = K.targets(n, v, 0, seed=11)
    st = _same_for_all_orders(H.fwd_stats(exe, x, t, 0, row_unroll=unroll))
    K.check_stats(st, x, t, 0, "cuda")
    lse = torch.logsumexp(x.double(), dim=1).float()
    scale = torch.linspace(-1.0, 1.0, n)
    scale[2] = 0.0
    for inplace in (False, True):
        outs = H.backward(exe, x, t, lse, scale, 0, inplace=inplace, row_unroll=unroll)
        K.check_grad(_same_for_all_orders(outs), x, t, 0, lse, scale, "cuda")


def _finalize_inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, generator=g) * 3
    s = torch.rand(n, generator=g) * 50 + 0.5
    t = torch.randn(n, generator=g) * 3
    m[1], s[1] = -INF, 0.0  # an all -inf row: NaN loss
    s[2] = NAN  # a NaN row
    stats = torch.stack([m, s, t], dim=1).contiguous()
    target = torch.randint(0, 100, (n,), generator=g)
    target[3], target[4] = -1, 100  # outside [0, v_global)
    ref = torch.rand(n, generator=g) * 6
    ref[5], ref[6], ref[7] = NAN, INF, -INF  # unscored rows
    mask = torch.rand(n, generator=g) < 0.8
    return stats, target, ref, mask


@needs_c
@pytest.mark.parametrize("n", [1, 37, 3000, 40000])
@pytest.mark.parametrize(
    "flags",
    [
        FINALIZE_RANK_EXCESS | FINALIZE_KEEP_UNSCORED | FINALIZE_SELECT_ALL,
        FINALIZE_RANK_EXCESS,
        FINALIZE_SELECT_ALL,
        0,
    ],
)
def test_finalize(exe, n, flags):
    """The finalize kernel (one block per 256 rows, at most 128 blocks: 40000 rows loop) against
    the C++ kernel (the same arithmetic: bitwise) and torch_finalize (float64 sums)."""
    stats, target, ref, mask = _finalize_inputs(max(n, 8), seed=n)
    stats, target, ref, mask = stats[:n], target[:n], ref[:n], mask[:n]
    for r, m in ((ref, mask), (None, None), (ref, None)):
        outs = H.finalize(exe, stats, target, 100, r, m, flags)
        got = outs[H.ORDERS[0]]
        for o in H.ORDERS[1:]:
            for a, b in zip(got, outs[o]):
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), o
        cpp = C.selective_loss_finalize(stats, target, 100, r, m, flags)
        ref_out = torch_finalize(stats, target, 100, r, m, flags)
        for i, (a, b, c) in enumerate(zip(got, cpp, ref_out)):
            if i < 3:  # loss, lse, score: bitwise, NaN where NaN
                assert torch.equal(a.view(torch.int32), b.view(torch.int32)), i
                torch.testing.assert_close(a, c, rtol=0, atol=0, equal_nan=True)
            elif i < 5:
                assert torch.equal(a, b) and torch.equal(a, c), i
            else:  # totals: same double sums in another order, one rounding to fp32
                torch.testing.assert_close(a, b, rtol=2**-23, atol=0, equal_nan=True)
                torch.testing.assert_close(a, c, rtol=2**-23, atol=0, equal_nan=True)
        assert got[5][6] == (target < 0).sum() + (target >= 100).sum()
        assert got[5][7] == (1.0 if got[5][6] == 0 else 0.0)  # targets_ok, for the assert


@needs_c
@pytest.mark.parametrize("n", [1, 37, 3000, 20000])
@pytest.mark.parametrize("nan_at", ["none", "top", "other"])
def test_add_top(exe, n, nan_at):
    """The top-k rows join the selection and its sums: one block (20000 rows: 40 per thread),
    one launch, the same bits in every order; against the C++ kernel, torch_add_top and the
    float64 sums. A NaN loss outside the top rows is never read into the sums."""
    top, loss, kept, totals = K.add_top_inputs(n, seed=n, nan_at=nan_at)
    issued = {}
    outs = H.add_top(exe, top, loss, kept, totals, issued=issued)
    assert set(issued.values()) == {(1, 0)}, issued
    sel, tot = outs[H.ORDERS[0]]
    for o in H.ORDERS[1:]:
        assert torch.equal(sel, outs[o][0]) and torch.equal(
            tot.view(torch.int32), outs[o][1].view(torch.int32)
        )
    assert torch.equal(sel, kept | top)
    want = totals.double()
    want[2] += top.sum()
    want[4] += loss.double()[top].sum()
    torch.testing.assert_close(tot, want.float(), rtol=2**-23, atol=0, equal_nan=True)
    assert math.isnan(tot[4]) == (nan_at == "top" and bool(top.any()))
    for impl in (C.selective_loss_add_top, torch_add_top):
        s2, t2 = kept.clone(), totals.clone()
        impl(top, loss, s2, t2)
        assert torch.equal(s2, sel)
        torch.testing.assert_close(t2, tot, rtol=2**-23, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------
def _ks(eligible):
    m = eligible.sum(dim=1)
    g = eligible.shape[0]
    ks = [1, int(m[1 % g]), max(1, int(m[2 % g]) // 3), 0, int(m[4 % g]) + 5, 2]
    return torch.tensor(ks[:g], dtype=torch.int64)


@needs_c
@pytest.mark.parametrize("n", [1, 17, 1000, 3000])
def test_select(exe, n):
    scores, eligible = K.select_inputs(6, n, seed=n)
    k = _ks(eligible)  # k = 1, k = n_eligible, a third, 0, more than eligible, 2
    got = _same_for_all_orders(H.select(exe, scores, eligible, k))
    for i in range(6):
        assert got[i].tolist() == reference_select(scores[i], eligible[i], int(k[i])), i
    assert torch.equal(got, C.selective_loss_select(scores, eligible, k))
    assert torch.equal(got, torch_select(scores, eligible, k))


SELECT_CHUNK = 8 * 1024  # kSelectChunk: scores per (group, chunk) work item of the select kernels


@pytest.mark.parametrize("n, launches, memsets", [(1, 1, 0), (SELECT_CHUNK, 1, 0),
                                                  (SELECT_CHUNK + 1, 10, 1)])  # fmt: skip
def test_select_launch_budget(exe, n, launches, memsets):
    """The select's fixed cost on a GPU: a group of one chunk (a micro-batch of up to 8192
    tokens) is one launch of one block per group, no workspace; a larger group is the
    multi-block radix select: a memset, 4 x (histogram + pick), count and write."""
    scores, eligible = K.select_inputs(2, n, seed=n)
    issued = {}
    got = _same_for_all_orders(H.select(exe, scores, eligible, None, issued=issued, ratio=0.6))
    assert set(issued.values()) == {(launches, memsets)}, issued
    assert torch.equal(got, torch_select(scores, eligible, None, 0.6))


@needs_c
@pytest.mark.parametrize("ratio", [0.6, 0.5, 0.001])
def test_select_derives_k_from_the_ratio(exe, ratio):
    """No k given: the first pick pass derives each group's k from the eligible count it has
    just summed (groups of one and of two chunks, one with nothing eligible)."""
    n = SELECT_CHUNK + 999
    scores, eligible = K.select_inputs(3, n, seed=7)
    eligible[1] = False
    ks = [num_to_keep(ratio, int(eligible[i].sum())) for i in range(3)]
    got = _same_for_all_orders(H.select(exe, scores, eligible, None, ratio=ratio))
    for i in range(3):
        assert got[i].tolist() == reference_select(scores[i], eligible[i], ks[i]), i
    assert torch.equal(got, C.selective_loss_select(scores, eligible, None, ratio))


@needs_c
@pytest.mark.parametrize("max_grid", [2147483647, 4])
def test_select_multi_block(exe, max_grid):
    """Groups of several chunks (one block each): digit histograms summed over blocks, equal keys
    taken in position order across chunk boundaries; with max_grid=4 blocks loop over items."""
    n = 2 * SELECT_CHUNK + 1234
    gen = torch.Generator().manual_seed(11)
    scores = torch.randint(0, 40, (3, n), generator=gen).float()  # ~500 copies of each key
    scores[1, ::5] = NAN
    scores[2, SELECT_CHUNK - 300 :] = 7.0  # one tie run straddling two chunk boundaries
    eligible = torch.rand(3, n, generator=gen) < 0.9
    # k: inside a tie group; 1; the k-th is a 7.0 in the last chunk (ties over all three chunks)
    above, equal = ((scores[2] > v).logical_and(eligible[2]).sum() for v in (7.0, 6.0))
    k = torch.tensor([n // 3, 1, int(equal) - 100])
    assert int(above) < int(k[2]) and (scores[2] == 7)[: 2 * SELECT_CHUNK].any()
    got = _same_for_all_orders(H.select(exe, scores, eligible, k, max_grid=max_grid))
    assert torch.equal(got, C.selective_loss_select(scores, eligible, k))
    for i in range(3):
        assert got[i].tolist() == reference_select(scores[i], eligible[i], int(k[i])), i


def test_select_signed_zeros_tie_by_position(exe):
    """Bug 2: -0.0 and +0.0 are equal scores; the lower position wins."""
    scores = torch.tensor([[-0.0, 0.0, -0.0, 0.0, 1.0]])
    eligible = torch.ones_like(scores, dtype=torch.bool)
    for kk in (1, 2, 3, 4):
        k = torch.tensor([kk])
        got = _same_for_all_orders(H.select(exe, scores, eligible, k))
        assert got[0].tolist() == reference_select(scores[0], eligible[0], kk), kk


@pytest.mark.parametrize("dropped", [[], [0, 3]])
def test_select_nan_ties_with_minus_inf(exe, dropped):
    """Bug 3: NaN ranks like -inf (lowest), ties by position, not below -inf. With entries not
    eligible too: the kernels mark them with key 0, just below -inf's key, and the k-th key here
    shares its first digit (0x00) with that mark."""
    scores = torch.tensor([[NAN, -INF, NAN, -INF, 2.0, NAN]])
    eligible = torch.ones_like(scores, dtype=torch.bool)
    eligible[0, dropped] = False
    for kk in range(1, 7 - len(dropped)):
        k = torch.tensor([kk])
        got = _same_for_all_orders(H.select(exe, scores, eligible, k))
        assert got[0].tolist() == reference_select(scores[0], eligible[0], kk), kk


# ------------------------------------------------------------------------------------------
# launches
# ------------------------------------------------------------------------------------------
@needs_c
def test_more_rows_than_the_grid_allows(exe):
    """Bug 6: rows beyond the device's grid limit are still processed (the kernels loop rows)."""
    n, v = 20, 1000
    x = K.logits(n, v, torch.float32, seed=3, special=False)
    t = K.targets(n, v, 0, seed=3)
    st = _same_for_all_orders(H.fwd_stats(exe, x, t, max_grid=7))
    K.check_stats(st, x, t, 0, "cuda")
    lse = torch.logsumexp(x.double(), dim=1).float()
    scale = torch.ones(n)
    gr = _same_for_all_orders(H.backward(exe, x, t, lse, scale, max_grid=7))
    K.check_grad(gr, x, t, 0, lse, scale, "cuda")
    scores, eligible = K.select_inputs(20, 50, seed=4)
    k = torch.full((20,), 10)
    got = _same_for_all_orders(H.select(exe, scores, eligible, k, max_grid=7))
    assert torch.equal(got, torch_select(scores, eligible, k))


@pytest.mark.parametrize("op", ["fwd", "bwd", "select", "add_top"])
def test_launch_failure_reaches_the_caller(exe, op):
    """Bug 5: a failed launch is reported by the launcher instead of leaving garbage."""
    x = K.logits(4, 8, torch.float32, seed=0, special=False)
    t = torch.zeros(4, dtype=torch.int64)
    kw = dict(fail_launch=701, orders=H.ORDERS[:1])  # cudaErrorLaunchOutOfResources
    with pytest.raises(H.DriverError) as e:
        if op == "fwd":
            H.fwd_stats(exe, x, t, **kw)
        elif op == "bwd":
            H.backward(exe, x, t, torch.zeros(4), torch.ones(4), **kw)
        elif op == "select":
            H.select(exe, x, x > 0, torch.ones(4, dtype=torch.int64), **kw)
        else:
            H.add_top(exe, t == 0, t.float(), t != 0, torch.zeros(8), **kw)
    assert e.value.returncode == 2 and "error 701" in e.value.stderr


def test_reference_ulp_helper():
    assert K.ulp(torch.tensor([1.0]), torch.float32).item() == 2.0**-23
    assert K.ulp(torch.tensor([1.5]), torch.float16).item() == 2.0**-10
    assert K.ulp(torch.tensor([0.0]), torch.bfloat16).item() == 2.0**-133
    assert math.isclose(K.ulp(torch.tensor([-3.0]), torch.bfloat16).item(), 2.0**-6)
