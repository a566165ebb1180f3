"""Benchmark of the fused selective loss op against megatron-core's cross entropy.

Measures forward+backward wall time and peak extra memory, all in the same run, for:

* ``megatron vocab_parallel_cross_entropy`` + masked mean (the anchor; ratio column "1.0" uses an
  all-ones mask, "0.6" the selection mask of the same ratio, so both do the same work)
* ``megatron fused_vocab_parallel_cross_entropy`` + masked mean (when importable and it runs)
* ``torch.nn.functional.cross_entropy(reduction="none")`` + masked mean
* Liger's ``liger_cross_entropy`` (mean over the rows not set to ``ignore_index``), on CUDA when
  ``liger-kernel`` is importable (an optional benchmark dependency: ``pip install liger-kernel``)
* ``selective_cross_entropy`` (impl auto = C++ on CPU, CUDA on GPU), ratio 1.0 and 0.6, with
  ``inplace_backward`` False and True, and the pure-PyTorch fallback (``impl="torch"``)

Time: median of ``--reps`` timed fwd+bwd iterations after one warm-up (fresh logits per
iteration, created outside the timed region; megatron's op overwrites its input). On CPU the
wall clock; on CUDA CUDA events around the call, with a sleep kernel queued just before, so the
events time the GPU's work and the gaps the call itself makes (host syncs), not Python's launch
latency on an idle GPU; a call whose host side outlasts that sleep (it waited for the GPU, or
is launch-bound) is flagged. ``--reps`` defaults to 3 on CPU, 10 on CUDA (3 warm-ups there).

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


def _init_dist(device="cpu"):
    import torch.distributed as dist

    if not dist.is_initialized():
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # megatron-core all-reduces over the TP group even at TP=1: NCCL keeps that on the GPU
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        addr = f"tcp://127.0.0.1:{port}"
        dist.init_process_group(backend, init_method=addr, rank=0, world_size=1)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)


def _make_inputs(shape, dtype, device, seed=0):
    s, b, v = shape
    if str(device).startswith("cuda"):  # GBs of logits: drawn on the device, in seconds
        gen = torch.Generator(device=device).manual_seed(seed)
        logits = (torch.randn(s, b, v, generator=gen, device=device) * 2.0).to(dtype)
        target = torch.randint(0, v, (s, b), generator=gen, device=device)
        ref = torch.rand(s, b, generator=gen, device=device) * 8.0
        return logits, target, ref
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


def _liger_cross_entropy():
    """Liger's cross entropy, or None where liger-kernel is not importable (it needs triton)."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception:  # noqa: BLE001 (missing package, or triton without a GPU)
        return None
    return liger_cross_entropy


def _variants(include_fused: bool, impl: str = "auto", device: str = "cpu"):
    """name -> (ratio, fn(logits_leaf, target, ref, mask) -> scalar loss). ``impl`` is our op's
    kernel choice ("cuda" in the GPU table, so a build without CUDA kernels fails loudly)."""
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
        liger_ce = _liger_cross_entropy() if str(device).startswith("cuda") else None
        if liger_ce is not None:

            def liger(x, t, r, m, _f=liger_ce):
                t = torch.where(m.bool(), t, -100)  # unselected rows -> ignore_index: same mean
                return _f(x.view(-1, x.shape[-1]), t.view(-1))

            out[f"liger cross_entropy @{ratio}"] = (ratio, liger)
        out[f"selective_cross_entropy @{ratio}"] = (ratio, ours(ratio, False, impl))
        out[f"selective_cross_entropy inplace @{ratio}"] = (ratio, ours(ratio, True, impl))
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


# Queued before each timed CUDA call: the host launches the whole call while the GPU sleeps, so
# the events see the GPU's work (and any wait the call itself forces), not launch latency. 10 ms
# is far above the expected host time of one call (tens of launches); the host time is checked
# against it on every call and a call that outlasts it is flagged, not hidden
# (benchmarks/gpu/profile_op.py prints the host time of one call of ours).
GPU_LEAD_S = 0.010
_cycles_per_s: list[float] = []


def _gpu_sleep(seconds):
    if not hasattr(torch.cuda, "_sleep"):
        return
    if not _cycles_per_s:  # calibrate the spin kernel once: cycles per second of this GPU
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(50_000_000)  # tens of ms: the clocks leave their idle level first
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        _cycles_per_s.append(10_000_000 / (start.elapsed_time(end) * 1e-3))
    torch.cuda._sleep(int(seconds * _cycles_per_s[0]))


def time_fwd_bwd(fn, base, target, ref, mask, reps, warmup):
    """Seconds of ``reps`` fwd+bwd calls after ``warmup`` (fresh logits each, cloned outside the
    timed region) and whether the host side of a call outlasted the GPU's lead (CUDA only: the
    call waited for the GPU or is launch-bound; timings then include that wait)."""
    if not base.is_cuda:
        for _ in range(warmup):
            _run_once(fn, base, target, ref, mask)
        return [_run_once(fn, base, target, ref, mask) for _ in range(reps)], False
    events, host = [], []
    for i in range(warmup + reps):
        x = base.clone().requires_grad_()
        lead, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        lead.record()
        _gpu_sleep(GPU_LEAD_S)
        start.record()
        h0 = time.perf_counter()
        loss = fn(x, target, ref, mask)
        loss.backward()
        host.append(time.perf_counter() - h0)
        end.record()
        if i >= warmup:
            events.append((lead, start, end))
        del x, loss
    torch.cuda.synchronize()
    # the sleep's real length (clocks vary), not GPU_LEAD_S, is what the host had to beat
    slept = statistics.median(a.elapsed_time(b) * 1e-3 for a, b, _ in events)
    waited = statistics.median(host[warmup:]) > 0.9 * slept
    return [b.elapsed_time(c) * 1e-3 for _, b, c in events], waited


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_child(name, dtype_name, shape, device):
    """Subprocess body: peak extra memory of one fwd+bwd of one variant."""
    _init_dist(device)
    dtype = DTYPES[dtype_name]
    variants = _variants(include_fused=True, device=device)
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


def _ms(seconds: float) -> str:
    """Milliseconds with 3 significant digits below 10 ms (a small --shape measures the fixed cost
    per call), one decimal above."""
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 10 else f"{ms:#.3g}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=[1024, 4, 32000])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=None, help="timed calls (3 on CPU, 10 on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-fused", action="store_true", help="skip megatron's fused variant")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = tuple(args.shape)

    if args.memory_child:
        _memory_child(args.memory_child, args.dtypes[0], shape, args.device)
        return

    cuda = args.device.startswith("cuda")
    reps = args.reps or (10 if cuda else 3)
    warmup = 3 if cuda else 1
    _init_dist(args.device)
    from megatron_slm import _extension

    print(
        f"# device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"{_extension.extension_status()} shape={list(shape)} reps={reps}"
    )
    fp32_copy = shape[0] * shape[1] * shape[2] * 4
    variants = _variants(include_fused=not args.no_fused, device=args.device)
    if cuda and not any(n.startswith("liger") for n in variants):
        print("# liger-kernel not importable: its rows are skipped (pip install liger-kernel)")
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
                times, waited = time_fwd_bwd(fn, base, target, ref, masks[ratio], reps, warmup)
                t = statistics.median(times)
            except Exception as exc:  # noqa: BLE001
                print(f"# {name} [{dtype_name}] failed: {type(exc).__name__}: {exc}"[:300])
                continue
            if name.startswith("megatron vocab_parallel"):
                anchor[ratio] = t
            mem = {} if args.no_memory else _measure_memory(name, dtype_name, shape, args.device)
            rows.append((dtype_name, name, ratio, t, anchor.get(ratio), mem))
            flag = " (host waited for the GPU: syncs or launch-bound)" if waited else ""
            print(f"# done {dtype_name} {name}: {_ms(t)} ms{flag}", flush=True)

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
        print(f"| {dtype_name} | {label} | {ratio} | {_ms(t)} | {sp} | {mib} | {frac} |")
    print(f"\none fp32 copy of the logits = {fp32_copy / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
