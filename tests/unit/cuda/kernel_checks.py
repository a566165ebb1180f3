"""Reference checks of the selective loss kernels' outputs, shared by the CPU harness tests
(tests/unit/cuda) and the GPU tests (tests/gpu).

Tolerances: maxima and target logits are exact (no arithmetic). A sum of V positive fp32 terms
each within 2 ulp (exp) is within (V + 2) * 2^-24 relative (the worst-case bound of recursive
summation). Gradients are computed in fp32 and rounded once: within 2 ulp of the dtype at the
magnitude entering the final subtraction (p * scale). On a GPU, __expf (--use_fast_math) has a
maximum error of 2 + floor(1.173 * |x|) ulp (CUDA C++ Programming Guide, intrinsic functions):
`fast_exp=True` adds that error to the gradient tolerance, and the sums get (2V + 20) * 2^-24,
because sum_i 1.173 |x_i| e^(x_i) <= 1.173 V / e over the terms, and the rescaling of at most
~10 partial sums per reduction step adds a few ulp each.
"""

from __future__ import annotations

import torch

MANT_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
MIN_EXP = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}
U32 = 2.0**-24
NAN, INF = float("nan"), float("inf")


def ulp(a: torch.Tensor, dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |a| (float64), subnormal spacing below the normal range."""
    _, e = torch.frexp(a.abs().double())
    e = torch.where(a == 0, MIN_EXP[dtype], torch.clamp(e - 1, min=MIN_EXP[dtype]))
    return torch.ldexp(torch.ones_like(a, dtype=torch.float64), e - MANT_BITS[dtype])


def logits(n, v, dtype, seed, special=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 3
    if special:
        x[1, 0] = NAN  # NaN as a thread's first value
        x[2, v // 2] = NAN
        x[3, ::3] = -INF  # -inf entries in a finite row
        x[4] = -INF  # all -inf
        x[5, -1] = INF
        x[6, 1:] = -INF  # a single finite entry
    return x.to(dtype)


def targets(n, v, vocab_start, seed):
    """Global target ids: in this shard, and (with vocab_start > 0) below and above it."""
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, v, (n,), generator=g) + vocab_start
    t[6] = vocab_start  # the finite entry of row 6
    if vocab_start > 0:
        t[7] = vocab_start - 1
        t[8] = vocab_start + v
        t[9] = 0
    return t


def stats_reference(x, t, vocab_start):
    """{max, sum exp(x - max), target logit or 0} in float64; all -inf rows give sum 0. The max
    follows the kernels' NaN rule: NaN is ignored (as fmaxf does), -inf when all are NaN."""
    xd = x.double()
    m = torch.where(torch.isnan(xd), -INF, xd).max(dim=1).values
    s = torch.exp(xd - m[:, None]).sum(dim=1)
    s = torch.where(m == -INF, torch.zeros_like(s), s)
    loc = t - vocab_start
    hit = (loc >= 0) & (loc < x.shape[1])
    tl = xd.gather(1, torch.where(hit, loc, 0)[:, None])[:, 0]
    return m, s, torch.where(hit, tl, torch.zeros_like(tl))


def check_stats(st, x, t, vocab_start, who, fast_exp=False):
    """stats[N, 3] (CPU tensor) of any implementation against the float64 reference.
    The max of a row with NaN is its largest non-NaN value in the C++, CUDA and pure-PyTorch
    kernels alike (csrc/selective_loss_kernels.h)."""
    st, x, t = st.cpu(), x.cpu(), t.cpu()
    m, s, tl = stats_reference(x, t, vocab_start)
    nan_row = torch.isnan(x.float()).any(dim=1) | (x.float() == INF).any(dim=1)
    ok = ~nan_row
    # maxima and target logits: exact (rows with NaN/+inf sum to NaN; their max follows the rule)
    assert torch.equal(st[:, 0].double(), m), who
    exact = dict(rtol=0, atol=0, equal_nan=True, msg=who)  # a NaN target logit stays NaN
    torch.testing.assert_close(st[:, 2].double(), tl, **exact)
    assert torch.isnan(st[nan_row, 1]).all(), f"{who}: rows with NaN or +inf must sum to NaN"
    terms = 2 * x.shape[1] + 20 if fast_exp else x.shape[1] + 2
    tol = terms * U32 * s[ok]
    err = (st[ok, 1].double() - s[ok]).abs()
    assert (err <= tol).all(), f"{who}: sum error {err.max()} > {tol.max()}"


def grad_reference(x, t, vocab_start, lse, scale, fast_exp=False):
    """(grad in float64 from the fp32 differences, per-element tolerance for `x.dtype`)."""
    d = x.float() - lse[:, None]  # the kernels' fp32 subtraction
    p = torch.exp(d.double())
    loc = t - vocab_start
    hit = (loc >= 0) & (loc < x.shape[1])
    onehot = torch.zeros_like(p)
    rows = torch.nonzero(hit)[:, 0]
    onehot[rows, loc[rows]] = 1.0
    g = (p - onehot) * scale.double()[:, None]
    g[scale == 0] = 0.0
    tol = 2 * ulp(torch.maximum(g.abs(), p * scale.double().abs()[:, None]), x.dtype)
    if fast_exp:  # __expf: 2 + floor(1.173 |d|) fp32 ulp of p, carried through * scale
        # __expf(-inf) is exactly 0: no error term there (inf ulps x 0 would make the bound NaN)
        exp_ulps = 2 + torch.floor(1.173 * d.double().abs())
        term = exp_ulps * ulp(p, torch.float32) * scale.double().abs()[:, None]
        tol = tol + torch.where(p == 0, torch.zeros_like(term), term)
    # zero-scale rows must be exactly 0 (their logits are not read; an all -inf row's p is NaN)
    tol[scale == 0] = 0.0
    return g, tol


def check_grad(gr, x, t, vocab_start, lse, scale, who, fast_exp=False):
    """grad[N, V] (any device) of any implementation against the float64 reference."""
    gr, x, t, lse, scale = gr.cpu(), x.cpu(), t.cpu(), lse.cpu(), scale.cpu()
    g, tol = grad_reference(x, t, vocab_start, lse, scale, fast_exp)
    got = gr.double()
    nan = torch.isnan(g)
    assert torch.equal(torch.isnan(got), nan), who
    fin = ~nan
    err = (got[fin] - g[fin]).abs()
    assert (err <= tol[fin]).all(), f"{who}: grad error {(err / tol[fin]).max() * 2} ulp"
    assert (gr[scale == 0] == 0).all(), who


def select_inputs(g, n, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(-20, 20, (g, n), generator=gen).float() / 4  # ties, negatives
    pick = torch.randint(0, 8, (g, n), generator=gen)
    specials = torch.tensor([0.0, -0.0, INF, -INF, NAN, 0.0, -0.0, NAN])
    special = torch.rand(g, n, generator=gen) < 0.3
    scores = torch.where(special, specials[pick], scores)
    eligible = torch.rand(g, n, generator=gen) < 0.8
    return scores, eligible


def add_top_inputs(n, seed, nan_at="none"):
    """top, loss, already selected rows and totals for add_top; ``nan_at`` "top" puts a NaN loss
    on a top row, "other" on a row outside the top."""
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(n, generator=g) * 8
    kept = torch.rand(n, generator=g) < 0.1  # already selected (the op's unscored rows)
    top = (torch.rand(n, generator=g) < 0.5) & ~kept  # disjoint, as in the op
    if nan_at == "top" and top.any():
        loss[top.nonzero()[0, 0]] = NAN
    if nan_at == "other" and (~top).any():
        loss[(~top).nonzero()[0, 0]] = NAN  # never summed
    totals = torch.tensor([9.0, 8.0, float(kept.sum()), 7.0, 3.25, 1.0, 0.0, 1.0])
    return top, loss, kept, totals
