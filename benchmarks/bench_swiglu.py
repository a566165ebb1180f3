"""Fused SwiGLU (ops.swiglu) against megatron-core's unfused expression, forward + backward.

    python benchmarks/bench_swiglu.py                                   # cpu, fp32
    python benchmarks/bench_swiglu.py --device cuda --dtype bf16        # one tinyllama MLP

One MLP activation of ``--tokens`` rows (sequence x micro-batch) and ``--ffn`` columns per half:
``x [tokens, 2 * ffn]`` -> ``[tokens, ffn]``, then the backward of a given gradient, as a layer's
training step runs it. Median of ``--iters`` timed calls after warm-up (CUDA events on a GPU), for
the unfused anchor and the fused op in the same run, then their ratio. On CUDA also the time to
move the fused op's bytes (read x twice and dy once, write y and dx: 8 x tokens x ffn elements) at
the device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from megatron_slm.ops.swiglu import has_swiglu_kernels, swiglu, swiglu_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_ms(run, iters: int, cuda: bool) -> float:
    """Median ms of ``run()`` over ``iters`` calls (3 warm-up calls first; CUDA events on a GPU).
    Also used by bench_rope.py."""
    times = []
    for i in range(iters + 3):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            run()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= 3:
            times.append(ms)
    return statistics.median(times)


def fwd_bwd(fn, x, dy):
    """A closure for :func:`time_ms`: ``fn(x).backward(dy)`` with ``x``'s gradient cleared."""

    def run():
        x.grad = None
        fn(x).backward(dy)

    return run


def copy_bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy (read + write) of 1 GiB (also bench_rope's)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 5 * 2 * src.numel() * src.element_size() / (start.elapsed_time(end) / 1e3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="fp32 cpu, bf16 cuda")
    p.add_argument("--tokens", type=int, default=None, help="rows (default 2048 cpu, 8192 cuda)")
    p.add_argument("--ffn", type=int, default=None, help="columns per half (1408 cpu, 5632 cuda)")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench_swiglu: no CUDA device", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    tokens = args.tokens or (8192 if cuda else 2048)
    ffn = args.ffn or (5632 if cuda else 1408)
    if not has_swiglu_kernels(device):
        print(f"bench_swiglu: megatron_slm._C has no SwiGLU kernels for {device}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(tokens, 2 * ffn, generator=g) * 2).to(dtype).to(device).requires_grad_()
    dy = torch.randn(tokens, ffn, generator=g).to(dtype).to(device)
    anchor = time_ms(fwd_bwd(swiglu_reference, x, dy), args.iters, cuda)
    fused = time_ms(fwd_bwd(lambda t: swiglu(t, impl="fused"), x, dy), args.iters, cuda)
    print(f"[{tokens}, 2 x {ffn}] {str(dtype).replace('torch.', '')} on {device}, fwd+bwd, "
          f"median of {args.iters}\n")  # fmt: skip
    print("| | ms | vs unfused |")
    print("|---|---:|---:|")
    print(f"| megatron-core's unfused SwiGLU (anchor) | {anchor:.3f} | 1.00x |")
    print(f"| fused (ops.swiglu) | {fused:.3f} | {fused / anchor:.2f}x |")
    if cuda:
        bound = 8 * tokens * ffn * x.element_size() / copy_bandwidth(device) * 1e3
        print(
            f"| bytes of the fused op at the copy bandwidth | {bound:.3f} | {bound / anchor:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
