"""Benchmark of the fused selective loss op against megatron-core's cross entropy.

Measures forward+backward wall time and peak extra memory, all in the same run, for:

* ``megatron vocab_parallel_cross_entropy`` + masked mean (the anchor; ratio column "1.0" uses an
  all-ones mask, "0.6" the selection mask of the same ratio, so both do the same work)
* ``megatron fused_vocab_parallel_cross_entropy`` + masked mean (when importable and it runs)
* ``torch.nn.functional.cross_entropy(reduction="none")`` + masked mean
* ``selective_cross_entropy`` (impl auto = C++ on CPU, CUDA on GPU), ratio 1.0 and 0.6, with
  ``inplace_backward`` False and True, and the pure-PyTorch fallback (``impl="torch"``)

Time: median of ``--reps`` timed fwd+bwd iterations after one warm-up (fresh logits per
iteration, created outside the timed region; megatron's op overwrites its input).

Memory (CPU): every (variant, dtype) runs once more in a fresh subprocess that builds its inputs
without temporaries, warms the code paths up on a tiny problem, reads the current RSS, runs one
fwd+bwd and reads the peak RSS (``VmHWM`` of /proc/self/status). "peak extra" = peak RSS -
RSS before the call (the peak is reset first through /proc/self/clear_refs),
so it includes the gradient tensor (one logits-sized buffer unless the
backward is in place) and every temporary. On CUDA: ``torch.cuda.max_memory_allocated`` delta.

Usage: ``python benchmarks/bench_selective_loss.py [--shape 1024 4 32000] [--dtypes fp32 bf16]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RATIO_SEL = 0.6


def _init_dist():
    import torch.distributed as dist

    if not dist.is_initialized():
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)


def _make_inputs(shape, dtype, device, seed=0):
    s, b, v = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.empty(s, b, v, dtype=dtype, device=device)
    flat = logits.view(-1, v)
    for r0 in range(0, s * b, 128):  # no full-size temporaries
        r1 = min(s * b, r0 + 128)
        flat[r0:r1] = (torch.randn(r1 - r0, v, generator=gen) * 2.0).to(dtype)
    target = torch.randint(0, v, (s, b), generator=gen).to(device)
    ref = (torch.rand(s, b, generator=gen) * 8.0).to(device)
    return logits, target, ref


def _selection_mask(logits, target, ref, ratio):
    """The mask the selective op would pick, for the anchors' masked mean (same work)."""
    from megatron_slm.ops import selective_cross_entropy

    with torch.no_grad():
        out = selective_cross_entropy(logits.clone(), target, ref_loss=ref, ratio=ratio)
    return out.selected.float()


def _variants(include_fused: bool):
    """name -> (ratio, fn(logits_leaf, target, ref, mask) -> scalar loss)."""
    import torch.nn.functional as F
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_slm.ops import selective_cross_entropy, selective_loss_mean

    def masked_mean(loss, mask):
        return (loss * mask).sum() / mask.sum().clamp(min=1)

    def megatron(x, t, r, m):
        return masked_mean(vocab_parallel_cross_entropy(x, t), m)

    def torch_ce(x, t, r, m):
        loss = F.cross_entropy(x.view(-1, x.shape[-1]), t.view(-1), reduction="none")
        return masked_mean(loss.view(t.shape).float(), m)

    def ours(ratio, inplace, impl):
        def fn(x, t, r, m):
            out = selective_cross_entropy(
                x, t, ref_loss=r, ratio=ratio, impl=impl, inplace_backward=inplace
            )
            return selective_loss_mean(out)

        return fn

    out = {}
    for ratio in (1.0, RATIO_SEL):
        out[f"megatron vocab_parallel_cross_entropy @{ratio}"] = (ratio, megatron)
        if include_fused:
            try:
                from megatron.core.fusions.fused_cross_entropy import (
                    fused_vocab_parallel_cross_entropy,
                )
                from megatron.core.parallel_state import get_tensor_model_parallel_group

                def fused(x, t, r, m, _f=fused_vocab_parallel_cross_entropy):
                    return masked_mean(_f(x, t, get_tensor_model_parallel_group()), m)

                out[f"megatron fused_vocab_parallel_cross_entropy @{ratio}"] = (ratio, fused)
            except Exception:  # noqa: BLE001
                pass
        out[f"torch F.cross_entropy @{ratio}"] = (ratio, torch_ce)
        out[f"selective_cross_entropy @{ratio}"] = (ratio, ours(ratio, False, "auto"))
        out[f"selective_cross_entropy inplace @{ratio}"] = (ratio, ours(ratio, True, "auto"))
        out[f"selective_cross_entropy impl=torch @{ratio}"] = (ratio, ours(ratio, False, "torch"))
    return out


def _run_once(fn, base, target, ref, mask):
    x = base.clone().requires_grad_()
    _sync(x)
    t0 = time.perf_counter()
    loss = fn(x, target, ref, mask)
    loss.backward()
    _sync(x)
    dt = time.perf_counter() - t0
    del x, loss
    return dt


def _sync(x):
    if x.is_cuda:
        torch.cuda.synchronize()


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_child(name, dtype_name, shape, device):
    """Subprocess body: peak extra memory of one fwd+bwd of one variant."""
    _init_dist()
    dtype = DTYPES[dtype_name]
    variants = _variants(include_fused=True)
    ratio, fn = variants[name]
    # warm up on a tiny problem (loads code paths, thread pools, allocator arenas)
    sx, st, sr = _make_inputs((8, 2, 256), dtype, device)
    sm = _selection_mask(sx, st, sr, ratio) if ratio < 1 else torch.ones_like(sr)
    _run_once(fn, sx, st, sr, sm)
    x0, target, ref = _make_inputs(shape, dtype, device)
    mask = _selection_mask(x0, target, ref, ratio) if ratio < 1 else torch.ones_like(ref)
    x = x0.requires_grad_()  # the op's input itself (no clone): only fn's allocations count
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = fn(x, target, ref, mask)
        loss.backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        print(json.dumps({"extra": extra, "slack": 0}))
        return
    rss0 = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM), Linux >= 4.0
        f.write("5")
    loss = fn(x, target, ref, mask)
    loss.backward()
    peak1 = _vm_hwm_bytes()
    print(json.dumps({"extra": max(0, peak1 - rss0), "slack": 0}))


def _vm_hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure_memory(name, dtype_name, shape, device):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-child",
        name,
        "--dtypes",
        dtype_name,
        "--device",
        device,
        "--shape",
        *map(str, shape),
    ]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001
        return {"error": str(exc)[:200]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=[1024, 4, 32000])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-fused", action="store_true", help="skip megatron's fused variant")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = tuple(args.shape)

    if args.memory_child:
        _memory_child(args.memory_child, args.dtypes[0], shape, args.device)
        return

    _init_dist()
    from megatron_slm import _extension

    print(
        f"# device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"{_extension.extension_status()} shape={list(shape)} reps={args.reps}"
    )
    fp32_copy = shape[0] * shape[1] * shape[2] * 4
    variants = _variants(include_fused=not args.no_fused)
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        base, target, ref = _make_inputs(shape, dtype, args.device)
        masks = {
            1.0: torch.ones_like(ref),
            RATIO_SEL: _selection_mask(base, target, ref, RATIO_SEL),
        }
        anchor = {}
        for name, (ratio, fn) in variants.items():
            try:
                _run_once(fn, base, target, ref, masks[ratio])  # warm-up
                times = [_run_once(fn, base, target, ref, masks[ratio]) for _ in range(args.reps)]
                t = statistics.median(times)
            except Exception as exc:  # noqa: BLE001
                print(f"# {name} [{dtype_name}] failed: {type(exc).__name__}: {exc}"[:300])
                continue
            if name.startswith("megatron vocab_parallel"):
                anchor[ratio] = t
            mem = {} if args.no_memory else _measure_memory(name, dtype_name, shape, args.device)
            rows.append((dtype_name, name, ratio, t, anchor.get(ratio), mem))
            print(f"# done {dtype_name} {name}: {t * 1e3:.1f} ms", flush=True)

    print()
    print(
        "| dtype | variant | ratio | fwd+bwd ms | speedup vs megatron | peak extra MiB "
        "| extra / fp32 logits |"
    )
    print("|---|---|---|---|---|---|---|")
    for dtype_name, name, ratio, t, a, mem in rows:
        label = name.rsplit(" @", 1)[0]
        sp = f"{a / t:.2f}x" if a else "-"
        if "extra" in mem:
            mib = f"{mem['extra'] / 2**20:.0f}"
            frac = f"{mem['extra'] / fp32_copy:.2f}"
        else:
            mib, frac = "n/a", "n/a"
            print(f"# memory of {name} [{dtype_name}] not measured: {mem.get('error')}")
        print(f"| {dtype_name} | {label} | {ratio} | {t * 1e3:.1f} | {sp} | {mib} | {frac} |")
    print(f"\none fp32 copy of the logits = {fp32_copy / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
