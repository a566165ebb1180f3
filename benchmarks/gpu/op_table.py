"""The selective loss op side by side with the cross entropies it replaces (issue 26's op table).

    python benchmarks/gpu/op_table.py                       # on a GPU: the issue's three shapes
    python benchmarks/gpu/op_table.py --device cpu --shapes 64x2x1000:bf16   # smoke run

Each cell: forward + backward of a scalar loss (mean over the kept tokens), median of ``--reps``
calls after warm-up, fresh logits per call (cloned outside the timed region), timed like
``benchmarks/bench_selective_loss.py`` (CUDA events on CUDA, a sleep kernel queued ahead).
Columns: torch ``F.cross_entropy``, megatron-core ``vocab_parallel_cross_entropy`` and its fused
variant, Liger (when importable), ours at ratio 1 and 0.6 with the in-place backward.

The bound of a shape is the time to move 3 x the logits' bytes (read in forward, read in
backward, the gradient written) at the device's copy bandwidth, measured in the same run by a
large device-to-device copy (bytes read + written / time). Targets: ours <= 1.3x the bound at
every shape, faster than Liger at every shape.

Prints a markdown table on stdout, one row per shape as soon as it is measured; progress on
stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_selective_loss as bsl  # noqa: E402

# issue 26's table: [s, b, v] and dtype
DEFAULT_SHAPES = ["8192x1x131072:bf16", "8192x1x131072:fp32", "4096x2x32000:bf16"]
TARGET_X_BOUND = 1.3
# column label -> variant name in bench_selective_loss._variants
COLUMNS = {
    "torch CE": "torch F.cross_entropy @1.0",
    "mcore": "megatron vocab_parallel_cross_entropy @1.0",
    "mcore fused": "megatron fused_vocab_parallel_cross_entropy @1.0",
    "Liger": "liger cross_entropy @1.0",
    "ours 1.0": "selective_cross_entropy inplace @1.0",
    "ours 0.6": "selective_cross_entropy inplace @0.6",
}


def parse_shape(text: str):
    """'8192x1x131072:bf16' -> ((8192, 1, 131072), 'bf16')."""
    dims, _, dtype = text.partition(":")
    shape = tuple(int(d) for d in dims.split("x"))
    if len(shape) != 3 or dtype not in bsl.DTYPES:
        raise argparse.ArgumentTypeError(f"--shapes: expected SxBxV:dtype, got {text!r}")
    return shape, dtype


def copy_bandwidth(device: str, nbytes: int, reps: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy of ``nbytes`` (median)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        if src.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[2:])


def measure_shape(shape, dtype_name, device, bandwidth, reps, warmup, include_fused, columns):
    """{column: (seconds, waited) or an error string}, and the bound in seconds."""
    dtype = bsl.DTYPES[dtype_name]
    base, target, ref = bsl._make_inputs(shape, dtype, device)
    mask = torch.ones_like(ref)  # the anchors' mean over all tokens (ratio 1)
    impl = "cuda" if device.startswith("cuda") else "auto"  # never a silent fallback on GPU
    variants = bsl._variants(include_fused=include_fused, impl=impl, device=device)
    bound = 3 * base.numel() * base.element_size() / bandwidth
    cells = {}
    for col in columns:
        name = COLUMNS[col]
        if name not in variants:
            cells[col] = "n/a"
            continue
        try:
            times, waited = bsl.time_fwd_bwd(
                variants[name][1], base, target, ref, mask, reps, warmup
            )
            cells[col] = (statistics.median(times), waited)
        except Exception as exc:  # noqa: BLE001 (one failing column must not lose the row)
            cells[col] = "failed"
            print(
                f"# {col} {list(shape)} {dtype_name} failed: {type(exc).__name__}: {exc}"[:400],
                file=sys.stderr,
            )
        cell = cells[col]
        shown = f"{cell[0] * 1e3:.2f} ms" if isinstance(cell, tuple) else cell
        print(f"# {list(shape)} {dtype_name} {col}: {shown}", file=sys.stderr, flush=True)
    del base, target, ref, mask
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return cells, bound


def _fmt(cell, bound):
    if not isinstance(cell, tuple):
        return cell
    sec, waited = cell
    return f"{sec * 1e3:.2f} ({sec / bound:.2f}x){' †' if waited else ''}"


def verdict(cells, bound):
    """The issue's targets for one shape, in words."""
    parts = []
    for col in ("ours 1.0", "ours 0.6"):
        c = cells.get(col)
        if isinstance(c, tuple):
            ok = c[0] <= TARGET_X_BOUND * bound
            parts.append(f"{col} {c[0] / bound:.2f}x bound {'PASS' if ok else 'FAIL'}")
    liger, ours = cells.get("Liger"), cells.get("ours 1.0")
    if isinstance(liger, tuple) and isinstance(ours, tuple):
        ok = ours[0] < liger[0]
        parts.append(f"vs Liger {liger[0] / ours[0]:.2f}x faster {'PASS' if ok else 'FAIL'}")
    elif not isinstance(liger, tuple):
        parts.append("vs Liger: not measured")
    return "; ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        default=[parse_shape(s) for s in DEFAULT_SHAPES],
        help="SxBxV:dtype ...",
    )
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--copy-bytes",
        type=int,
        default=None,
        help="bandwidth probe size (default 4 GiB on CUDA, 256 MiB on CPU)",
    )
    p.add_argument("--no-fused", action="store_true", help="skip megatron-core's fused variant")
    p.add_argument(
        "--columns",
        nargs="+",
        choices=list(COLUMNS),
        default=list(COLUMNS),
        help="measure these columns only (e.g. ours under another MEGATRON_SLM_ROW_UNROLL)",
    )
    args = p.parse_args(argv)

    bsl._init_dist(args.device)
    from megatron_slm import _extension

    copy_bytes = args.copy_bytes or (4 << 30 if args.device.startswith("cuda") else 256 << 20)
    bandwidth = copy_bandwidth(args.device, copy_bytes)
    liger = "importable" if bsl._liger_cross_entropy() is not None else "not importable"
    print(
        f"Device copy bandwidth (read + write, {copy_bytes / 2**30:.2f} GiB copy): "
        f"{bandwidth / 1e12:.2f} TB/s. Bound = 3 x logits bytes at that bandwidth. "
        f"{_extension.extension_status()}; liger-kernel {liger}."
    )
    print(
        f"\nCells: median ms of {args.reps} fwd+bwd calls (x bound); † = the host waited for "
        "the GPU during the call (host syncs or launch-bound). Ours: in-place backward.\n"
    )
    cols = list(args.columns)
    unroll = os.environ.get("MEGATRON_SLM_ROW_UNROLL")
    if unroll:
        print(f"MEGATRON_SLM_ROW_UNROLL={unroll} (the row kernels' vectors in flight per thread)\n")
    print("| shape | dtype | bound ms | " + " | ".join(cols) + " | targets |")
    print("|---|---|---:|" + "---:|" * len(cols) + "---|", flush=True)
    for shape, dtype_name in args.shapes:
        cells, bound = measure_shape(
            shape,
            dtype_name,
            args.device,
            bandwidth,
            args.reps,
            args.warmup,
            not args.no_fused,
            cols,
        )
        row = " | ".join(_fmt(cells[c], bound) for c in cols)
        shown = "[" + ", ".join(map(str, shape)) + "]"
        print(
            f"| {shown} | {dtype_name} | {bound * 1e3:.2f} | {row} | {verdict(cells, bound)} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
