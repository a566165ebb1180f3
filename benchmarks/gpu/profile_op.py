"""Kernel-level profile of one call of the selective loss op, so its fixed cost shows.

    python benchmarks/gpu/profile_op.py                      # [4096, 2, 32000] bf16 on a GPU
    python benchmarks/gpu/profile_op.py --device cpu --shape 64 2 1000   # smoke run (aten ops)

For ratio 1 and 0.6 (in-place backward, as the trainer calls it): after warm-up, one forward +
backward of the mean loss under ``torch.profiler``. Prints, as compact markdown, each GPU kernel
(and memcpy/memset) by name with its launch count and total / mean GPU time, then the totals: the
number of kernels, their summed GPU time, the call's GPU time between two CUDA events, and the
host time of the call (from its start until ``backward()`` returns, no sync), both measured
outside the profiler. On CPU the rows are aten operators with their self time (our C++ kernels
are not aten operators: a smoke run of the table, not a profile).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_selective_loss as bsl  # noqa: E402

NAME_WIDTH = 100  # kernel names are long C++ templates: the head says which kernel it is


def kernel_rows(prof, cuda: bool):
    """[(name, count, total_us)], largest total first: GPU activity on CUDA, aten self time on
    CPU."""
    count, total = collections.Counter(), collections.Counter()
    for evt in prof.events():
        if cuda:
            if evt.device_type != DeviceType.CUDA:
                continue
            us = evt.time_range.elapsed_us()
        else:
            if evt.device_type != DeviceType.CPU or not evt.name.startswith("aten::"):
                continue
            us = evt.self_cpu_time_total
        count[evt.name] += 1
        total[evt.name] += us
    return sorted(((n, count[n], total[n]) for n in count), key=lambda r: -r[2])


def _short(name: str) -> str:
    name = name.replace("|", "/")  # markdown cells
    return name if len(name) <= NAME_WIDTH else name[: NAME_WIDTH - 1] + "…"


def profile_call(fn, base, target, ref, mask, warmup: int = 2):
    """Profile one fwd+bwd call. Returns (rows, gpu_us, host_us): the call's GPU time between
    CUDA events (median of 5, ``bsl.time_fwd_bwd``; None on CPU) and its host time (median of
    5 calls on an idle device, no sync inside: launch cost plus any wait the call forces), both
    measured without the profiler, whose overhead would inflate them."""
    cuda = base.is_cuda
    for _ in range(warmup):
        bsl._run_once(fn, base, target, ref, mask)
    host = []
    for _ in range(5):
        x = base.clone().requires_grad_()
        bsl._sync(x)
        h0 = time.perf_counter()
        fn(x, target, ref, mask).backward()
        host.append((time.perf_counter() - h0) * 1e6)
        bsl._sync(x)
    gpu_us = None
    if cuda:
        gpu_us = statistics.median(bsl.time_fwd_bwd(fn, base, target, ref, mask, 5, 0)[0]) * 1e6
    x = base.clone().requires_grad_()
    bsl._sync(x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn(x, target, ref, mask).backward()
        bsl._sync(x)
    return kernel_rows(prof, cuda), gpu_us, statistics.median(host)


def render(title: str, rows, gpu_us, host_us, cuda: bool) -> str:
    what = "kernel / copy (GPU)" if cuda else "aten op (CPU self time)"
    lines = [
        f"#### {title}",
        "",
        f"| {what} | calls | total us | mean us |",
        "|---|---:|---:|---:|",
    ]
    for name, n, us in rows:
        lines.append(f"| `{_short(name)}` | {n} | {us:.1f} | {us / n:.1f} |")
    n_all = sum(r[1] for r in rows)
    us_all = sum(r[2] for r in rows)
    lines.append("")
    call = f"; the call between CUDA events {gpu_us:.1f} us" if gpu_us is not None else ""
    lines.append(
        f"{n_all} {'kernels' if cuda else 'ops'}, {us_all:.1f} us summed{call}; "
        f"host time of the call {host_us:.1f} us (median of 5, outside the profiler)."
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, nargs=3, default=[4096, 2, 32000])
    p.add_argument("--dtype", default="bf16", choices=list(bsl.DTYPES))
    args = p.parse_args(argv)
    shape, cuda = tuple(args.shape), args.device.startswith("cuda")
    bsl._init_dist(args.device)
    base, target, ref = bsl._make_inputs(shape, bsl.DTYPES[args.dtype], args.device)
    mask = torch.ones_like(ref)
    variants = bsl._variants(False, impl="cuda" if cuda else "auto", device=args.device)
    print(f"### One call of ours, {list(shape)} {args.dtype}, in-place backward\n")
    for ratio in (1.0, bsl.RATIO_SEL):
        fn = variants[f"selective_cross_entropy inplace @{ratio}"][1]
        rows, gpu_us, host_us = profile_call(fn, base, target, ref, mask)
        print(render(f"ratio {ratio}", rows, gpu_us, host_us, cuda), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
