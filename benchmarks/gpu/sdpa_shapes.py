"""Forward-only attention over many batch widths: what a new shape costs with and without cuDNN.

    python benchmarks/gpu/sdpa_shapes.py                    # on a GPU: bf16, the tinyllama heads
    python benchmarks/gpu/sdpa_shapes.py --device cpu --widths 4 --max-width 128   # smoke run

The scorer's length-sorted rows give nearly every batch a width of its own. SDPA tries cuDNN first
on sm90 with a recent cuDNN, and cuDNN builds one execution graph per shape; the torch spec turns
cuDNN off for models in eval mode, the scorer's among them
(``models.specs._without_cudnn_attention``). For each choice, the call the spec makes (``[b, heads,
s, 64]`` query, grouped key/value, ``is_causal``, ``enable_gqa``, inference mode) at ``--widths``
distinct widths: first the first call at each width (host wall time to the end of its GPU work,
graph builds included), then a second pass over the same widths (cached). Prints a markdown table:
the backend SDPA picks, ms per first call, ms per cached call, and what the first calls cost on top
of the cached ones in all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megatron_slm.models.specs import _without_cudnn_attention  # noqa: E402


def _inputs(b: int, heads: int, groups: int, width: int, head_dim: int, dtype, device):
    q = torch.randn(b, heads, width, head_dim, dtype=dtype, device=device)
    k, v = (torch.randn(b, groups, width, head_dim, dtype=dtype, device=device) for _ in range(2))
    return q, k, v


def _call(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pass(widths, args, device, dtype) -> float:
    """Seconds for one call at each width, each timed to the end of its device work."""
    total = 0.0
    for w in widths:
        q, k, v = _inputs(args.batch, args.heads, args.groups, w, args.head_dim, dtype, device)
        _sync(device)
        start = time.perf_counter()
        _call(q, k, v)
        _sync(device)
        total += time.perf_counter() - start
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--widths", type=int, default=48, help="distinct widths per choice")
    p.add_argument("--max-width", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="rows (the scorer's micro-batch)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--groups", type=int, default=4, help="key/value heads")
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sdpa_shapes: no CUDA device (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Each choice gets widths of its own (odd offsets), so no choice reuses another's graphs.
    step = max(1, (args.max_width - 64) // args.widths)
    choices = {
        "SDPA's default order": contextlib.nullcontext,
        "without cuDNN (the torch spec in eval mode)": _without_cudnn_attention,
    }
    print(
        f"[{args.batch}, {args.heads} heads ({args.groups} key/value), width, {args.head_dim}] "
        f"{str(dtype).replace('torch.', '')}, causal, inference mode; {args.widths} distinct "
        f"widths up to {args.max_width} per choice. ms per call, timed to the end of its device "
        f"work.\n"
    )
    print("| choice | backend picked | first call at a width | cached call | first calls' extra |")
    print("|---|---|---:|---:|---:|")
    with torch.inference_mode():
        q, k, v = _inputs(args.batch, args.heads, args.groups, 64, args.head_dim, dtype, device)
        _call(q, k, v)  # library loading and allocator warm-up, outside every timing
        for offset, (name, ctx) in enumerate(choices.items()):
            widths = [64 + 2 * offset + 1 + i * step for i in range(args.widths)]
            widths = [min(w, args.max_width) for w in widths]
            with ctx():
                q, k, v = _inputs(
                    args.batch, args.heads, args.groups, 64, args.head_dim, dtype, device
                )
                picked = SDPBackend(
                    torch._fused_sdp_choice(q, k, v, None, 0.0, True, enable_gqa=True)
                ).name
                first = timed_pass(widths, args, device, dtype)
                cached = timed_pass(widths, args, device, dtype)
            n = len(widths)
            print(
                f"| {name} | {picked} | {1e3 * first / n:.2f} | {1e3 * cached / n:.2f} | "
                f"{first - cached:.2f} s |"
            )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
