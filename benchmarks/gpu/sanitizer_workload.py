"""A tiny workload of the selective loss op for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python benchmarks/gpu/sanitizer_workload.py
    python benchmarks/gpu/sanitizer_workload.py --device cpu   # the same cases, C++ kernels

Forward + backward of ``selective_cross_entropy`` over fp32 / bf16 / fp16, ratios 1, 0.6 and
0.01, in place and not, on logits with NaN entries, -inf entries, all -inf rows and a row with
one finite entry, reference losses with NaN (unscored tokens) and a loss mask; vocabularies
that take the vectorized and the scalar paths, one selection that fills most of the one-block
select kernel's shared staging (several load rounds and write tiles) and one over more than one
block of the CUDA select kernels. Shapes are tiny: racecheck instruments every shared-memory access.
Then the fused SwiGLU (``ops.swiglu``) forward + backward over the three dtypes, on its vector path
and its one-value path (odd width, a misaligned view), with NaN and infinities; and the fused
RoPE (``ops.rope``) forward + backward: the vector path, a strided key view of a QKV projection,
a small head and a misaligned view (one pair per thread).

Each call is also checked, coarsely (a memory bug gives garbage, not rounding; the precise checks
are tests/gpu's): losses against a float64 log-sum-exp, the number of selected tokens, and zero
gradient on every row not selected. Prints one line per failure and ``sanitizer workload: N calls,
0 failures``; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatron_slm.ops import selective_cross_entropy, selective_loss_mean
from megatron_slm.ops.rope import apply_rope, rope_reference
from megatron_slm.ops.selective_loss_reference import num_to_keep
from megatron_slm.ops.swiglu import swiglu, swiglu_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RATIOS = (1.0, 0.6, 0.01)
# [s, b, v]: v = 4096 takes the vectorized path, 1001 (odd) the scalar one
SHAPES = ((16, 2, 4096), (24, 2, 1001))
# 8000 tokens: one block of the CUDA select kernels, its 8192-key shared staging nearly full
ONE_BLOCK_FULL = (4000, 2, 64)
# 8400 tokens: more than one 8192-token block of the CUDA select kernels
MULTI_BLOCK = (4200, 2, 64)


def make_case(shape, dtype, seed):
    """Logits with the special rows, targets, reference losses with NaN, a loss mask."""
    s, b, v = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s * b, v, generator=g) * 3
    x[1, 0] = float("nan")
    x[2, ::3] = -float("inf")
    x[3] = -float("inf")  # all -inf: loss NaN
    x[4, 1:] = -float("inf")  # one finite entry
    x[5, -1] = float("inf")
    target = torch.randint(0, v, (s, b), generator=g)
    ref = torch.rand(s, b, generator=g) * 5
    ref[0] = float("nan")  # unscored (first token of a document)
    mask = torch.ones(s, b)
    mask[-2:, 0] = 0
    return x.view(s, b, v).to(dtype), target, ref, mask


def expected_loss(x, target):
    """Float64 cross entropy of the (already rounded) logits."""
    xd = x.double()
    return torch.logsumexp(xd, -1) - xd.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def run_case(shape, dtype, ratio, inplace, device, impl, seed):
    """One fwd+bwd call and its checks; returns a list of failure messages."""
    x_cpu, t_cpu, r_cpu, m_cpu = make_case(shape, dtype, seed)
    x = x_cpu.to(device).requires_grad_()
    t, r, m = t_cpu.to(device), r_cpu.to(device), m_cpu.to(device)
    out = selective_cross_entropy(
        x * 1, t, ref_loss=r, loss_mask=m, ratio=ratio, impl=impl, inplace_backward=inplace
    )
    selective_loss_mean(out).backward()
    loss, sel, grad = out.loss.cpu().double(), out.selected.cpu(), x.grad.cpu()
    want = expected_loss(x_cpu, t_cpu)
    name = f"{list(shape)} {dtype} ratio={ratio} inplace={inplace}"
    fails = []
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(loss), finite):
        fails.append(f"{name}: finite losses differ from the float64 reference")
    elif not torch.allclose(loss[finite], want[finite], rtol=1e-3, atol=1e-3):
        err = (loss[finite] - want[finite]).abs().max().item()
        fails.append(f"{name}: loss off by {err:.3g}")
    valid = m_cpu.bool()
    scored = valid & torch.isfinite(r_cpu)
    # scores of tokens with a NaN loss are NaN and rank last, but they are still scored
    n_want = num_to_keep(ratio, int(scored.sum())) + int((valid & ~scored).sum())
    if int(sel.sum()) != n_want:
        fails.append(f"{name}: {int(sel.sum())} selected, expected {n_want}")
    if (sel & ~valid).any():
        fails.append(f"{name}: a masked token was selected")
    if (grad[~sel] != 0).any():
        fails.append(f"{name}: nonzero gradient on a row not selected")
    return fails


def run_swiglu_case(rows, f, dtype, offset, device, seed):
    """Fused SwiGLU fwd+bwd on ``[rows, 2f]`` (a view ``offset`` elements into its buffer),
    checked against the unfused float64 expression: positions of NaN, values within 2% (a memory
    bug gives garbage)."""
    g = torch.Generator().manual_seed(seed)
    buf = (torch.randn(rows * 2 * f + offset, generator=g) * 4).to(dtype)
    buf[offset : offset + 3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    x = torch.empty(rows * 2 * f + offset, dtype=dtype, device=device)[offset:]  # misaligned
    x = x.view(rows, 2 * f).copy_(buf[offset:].view(rows, 2 * f)).requires_grad_()  # if offset
    dy = torch.randn(rows, f, generator=g).to(dtype)
    y = swiglu(x, impl="fused")  # the compiled kernels on the CPU too (--device cpu)
    y.backward(dy.to(device))
    xd = buf[offset:].view(rows, 2 * f).double().requires_grad_()
    want = swiglu_reference(xd)
    want.backward(dy.double())
    name = f"swiglu [{rows}, {2 * f}] {dtype} offset={offset}"
    fails = []
    for what, got, exp in (("y", y, want), ("dx", x.grad, xd.grad)):
        got, exp = got.detach().cpu().double(), exp.detach()
        if not torch.equal(got.isnan(), exp.isnan()):
            fails.append(f"{name}: NaN positions of {what} differ")
        elif not torch.allclose(got, exp, rtol=2e-2, atol=2e-2, equal_nan=True):
            fails.append(f"{name}: {what} off by {(got - exp).abs().nan_to_num().max():.3g}")
    return fails


def run_rope_case(s, heads, d, dtype, layout, device, seed):
    """Fused RoPE fwd+bwd on ``[s, 2, heads, d]``: ``layout`` contiguous, ``key`` (the key view
    of a ``[s, 2, heads, 3d]`` projection) or ``shifted`` (one element past an aligned start),
    checked against the unfused float64 RoPE: values within 2% (a memory bug gives garbage)."""
    g = torch.Generator().manual_seed(seed)
    width = 3 * d if layout == "key" else d
    src = (torch.randn(s, 2, heads, width, generator=g) * 4).to(dtype)
    if layout == "shifted":
        buf = torch.empty(src.numel() + 1, dtype=dtype, device=device)
        buf[1:].copy_(src.view(-1))
        leaf = buf.requires_grad_()
        t = leaf[1:].view(src.shape)
    else:
        leaf = src.to(device, copy=True).requires_grad_()
        t = leaf[..., d : 2 * d] if layout == "key" else leaf
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    f = torch.outer(torch.arange(s, dtype=torch.float32) * 50, inv)
    freqs = torch.cat([f, f + 0.5], dim=-1)[:, None, None, :]
    dy = torch.randn(s, 2, heads, d, generator=g).to(dtype)
    y = apply_rope(t, freqs.to(device), impl="fused")  # the compiled kernel on the CPU too
    y.backward(dy.to(device))
    td = src[..., d : 2 * d] if layout == "key" else src
    td = td.detach().double().requires_grad_()
    want = rope_reference(td, freqs.double())
    want.backward(dy.double())
    name = f"rope [{s}, 2, {heads}, {d}] {dtype} {layout}"
    fails = []
    grad = leaf.grad[1:].view(src.shape) if layout == "shifted" else leaf.grad
    grad = grad[..., d : 2 * d] if layout == "key" else grad
    for what, got, exp in (("y", y, want), ("dx", grad, td.grad)):
        got, exp = got.detach().cpu().double(), exp.detach()
        if not torch.allclose(got, exp, rtol=2e-2, atol=5e-2):
            fails.append(f"{name}: {what} off by {(got - exp).abs().nan_to_num().max():.3g}")
    return fails


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    impl = "cuda" if args.device.startswith("cuda") else "auto"  # the CUDA kernels, or fail
    cases = [
        (shape, dtype, ratio, inplace)
        for shape in SHAPES
        for dtype in DTYPES.values()
        for ratio in RATIOS
        for inplace in (False, True)
    ]
    cases.append((ONE_BLOCK_FULL, torch.bfloat16, 0.6, True))
    cases.append((MULTI_BLOCK, torch.float32, 0.6, True))
    fails = []
    for i, case in enumerate(cases):
        fails += run_case(*case, device=args.device, impl=impl, seed=i)
    swiglu_cases = [(64, 32, d, 0) for d in DTYPES.values()]
    swiglu_cases += [(9, 32, torch.bfloat16, 1), (9, 13, torch.bfloat16, 1)]  # misaligned; odd
    for i, case in enumerate(swiglu_cases):
        fails += run_swiglu_case(*case, device=args.device, seed=i)
    rope_cases = [(32, 4, 64, d, "contiguous") for d in DTYPES.values()]
    rope_cases += [(16, 2, 64, torch.bfloat16, "key"), (9, 3, 6, torch.float32, "contiguous")]
    rope_cases += [(9, 2, 64, torch.bfloat16, "shifted")]
    for i, case in enumerate(rope_cases):
        fails += run_rope_case(*case, device=args.device, seed=i)
    for f in fails:
        print("FAIL", f)
    n_calls = len(cases) + len(swiglu_cases) + len(rope_cases)
    print(f"sanitizer workload: {n_calls} calls, {len(fails)} failures", flush=True)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
