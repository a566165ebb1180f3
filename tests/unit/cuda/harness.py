"""Build and run the CPU harness driver of the CUDA kernels (csrc/cuda/testing/).

The driver compiles ``csrc/cuda/selective_loss.cu`` unchanged as C++ under
``csrc/cuda/testing/simt_host.h`` and runs its launchers on host memory; see the driver's header
comment for its command line. Builds are cached per source hash in the pytest temp dir (or
``$MEGATRON_SLM_HARNESS_BUILD``), never in the source tree.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]
CSRC = ROOT / "csrc"
TESTING = CSRC / "cuda" / "testing"
KERNELS = CSRC / "cuda" / "selective_loss.cu"
SWIGLU_KERNELS = CSRC / "cuda" / "swiglu.cu"  # linked into every driver build (its swiglu ops)
ROPE_KERNELS = CSRC / "cuda" / "rope.cu"  # and this one (its rope op)
DRIVER = TESTING / "selective_loss_driver.cpp"

# Thread and block orders: forward runs blocks in ascending order, reverse descending, random a
# seeded permutation (and threads in the same priority orders).
ORDERS = ("forward", "reverse", "random:12345")
# Adversarial orders need a build with race=True: several blocks resident at once, threads
# switching at every atomic and at random loads / stores of shared and device memory.
ADVERSARIAL = ("adversarial:1", "adversarial:2")
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Bit views of each dtype (numpy has no bfloat16): outputs are compared bit for bit.
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

CXX = os.environ.get("CXX", "g++")
BASE_FLAGS = ["-std=c++17", "-O2", "-g", "-Wall", "-Wextra", "-Wno-unknown-pragmas"]
SANITIZE_FLAGS = [
    "-O1",
    "-fno-omit-frame-pointer",
    # float-cast-overflow is not part of GCC's "undefined": NaN / out-of-range float -> int
    "-fsanitize=address,undefined,float-cast-overflow",
    "-fno-sanitize-recover=all",
]
# The race build: -fsanitize=thread only for its instrumentation (a call before every load and
# store), linked without the TSan runtime; simt_memory_hooks.cpp receives the calls.
# (-fno-threadsafe-statics: one OS thread, and no __tsan_atomic guard loads to provide.)
# -O1 -g0 halves its compile time; it only has to run small inputs.
RACE_FLAGS = [
    "-O1",
    "-g0",
    "-fsanitize=thread",
    "--param=tsan-instrument-func-entry-exit=0",
    "-fno-threadsafe-statics",
    "-Wno-tsan",
]
MEMORY_HOOKS = TESTING / "simt_memory_hooks.cpp"
QUICK_FLAGS = ["-O1", "-g0"]


def have_compiler() -> bool:
    return shutil.which(CXX) is not None


def _build_dir() -> Path:
    d = os.environ.get("MEGATRON_SLM_HARNESS_BUILD")
    path = Path(d) if d else Path(tempfile.gettempdir()) / "megatron_slm_harness"
    path.mkdir(parents=True, exist_ok=True)
    return path


_INCLUDE = re.compile(rb"^\s*#\s*include\s*[<\"]([^>\"]+)[>\"]", re.M)


def _local_headers(src: Path, dirs: list[Path]) -> list[Path]:
    """The project headers `src` includes, directly or not (those found in its own directory or
    in `dirs`, in the compiler's order; <cuda_runtime.h> is the harness's stub, system headers are
    not found): what its object's cache key must cover."""
    seen: dict[Path, None] = {}
    todo = [src]
    while todo:
        f = todo.pop()
        for name in _INCLUDE.findall(f.read_bytes()):
            for d in (f.parent, *dirs):
                h = (d / name.decode()).resolve()
                if h.is_file():
                    if h not in seen:
                        seen[h] = None
                        todo.append(h)
                    break
    return sorted(seen)


def build(
    kernels: Path = KERNELS,
    sanitize: bool = False,
    extra_sources=(),
    name="driver",
    driver: Path = DRIVER,
    race: bool = False,
    include_first: Path | None = None,
    quick: bool = False,
) -> Path:
    """Compile kernels + driver into an executable and return its path. Objects are cached by
    content (flags, source, the headers it includes), so that variants of the kernels only
    recompile the kernels.

    race: every source instrumented with RACE_FLAGS and the memory hooks linked (the adversarial
    orders). include_first: a directory searched before csrc/ (planted copies of headers).
    quick: -O1 without debug info, for planted variants (half the compile time)."""
    assert not (race and sanitize), "the race build replaces the sanitizer runtimes' hooks"
    flags = BASE_FLAGS + (SANITIZE_FLAGS if sanitize else []) + (QUICK_FLAGS if quick else [])
    # csrc/cuda too: a modified copy of the kernels elsewhere still finds selective_loss_cuda.h
    dirs = [CSRC, CSRC / "cuda", TESTING / "include", TESTING]
    if include_first is not None:
        dirs.insert(0, Path(include_first))
    incs = [f"-I{d}" for d in dirs]
    sources = [*([Path(kernels)] if kernels else []), Path(driver), *map(Path, extra_sources)]
    if Path(driver) == DRIVER:
        sources += [SWIGLU_KERNELS, ROPE_KERNELS]
    objects = []
    for src, src_flags in [(s, flags + (RACE_FLAGS if race else [])) for s in sources] + (
        [(MEMORY_HOOKS, flags)] if race else []
    ):
        h = hashlib.sha256(" ".join([CXX, *src_flags]).encode() + src.read_bytes())
        for header in _local_headers(src, dirs):
            h.update(header.read_bytes())
        obj = _build_dir() / f"{src.stem}-{h.hexdigest()[:16]}.o"
        if not obj.exists():
            _compile([CXX, *src_flags, *incs, "-c", "-x", "c++", str(src)], obj)
        objects.append(obj)
    h = hashlib.sha256(" ".join([CXX, *flags, *(o.name for o in objects)]).encode())
    out = _build_dir() / f"{name}-{h.hexdigest()[:16]}"
    if not out.exists():
        _compile([CXX, *flags, *map(str, objects)], out)
    return out


def _compile(cmd, out: Path) -> None:
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    p = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"harness build failed: {' '.join(cmd)}\n{p.stderr}")
    tmp.rename(out)


class DriverError(RuntimeError):
    def __init__(self, returncode: int, stderr: str):
        super().__init__(f"driver exit {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


def _write(path: Path, t: torch.Tensor) -> None:
    t = t.contiguous().cpu()
    if t.dtype in _BITS:
        t = t.view(_BITS[t.dtype])
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    path.write_bytes(t.numpy().tobytes())


def _run(exe: Path, tmp: Path, args: dict, orders) -> None:
    cmd = [str(exe), f"dir={tmp}", f"orders={','.join(orders)}"]
    cmd += [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in args.items()]
    env = dict(
        os.environ,
        ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=66",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=67",
    )
    if "row_unroll" in args:  # the row kernels' variant (read from the environment, as on a GPU)
        args = dict(args)
        env["MEGATRON_SLM_ROW_UNROLL"] = str(args.pop("row_unroll"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise DriverError(p.returncode, p.stderr)


def _read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8).copy()
    t = torch.from_numpy(raw)
    if dtype == torch.bool:
        return t.to(torch.bool).reshape(shape)
    if dtype in _BITS:
        return t.view(_BITS[dtype]).view(dtype).reshape(shape)
    return t.view(dtype).reshape(shape)


def _issued(tmp: Path, orders, with_blocks: bool = False) -> dict:
    """{order: (kernel launches, memsets)} that the driver counted for the call (``with_blocks``:
    and the blocks of all its launches, which show the path a launcher took)."""
    n = 3 if with_blocks else 2
    return {
        o: tuple(int(x) for x in (tmp / f"issued_{o}.txt").read_text().split()[:n]) for o in orders
    }


def fwd_stats(exe, logits, target, vocab_start=0, misalign=0, orders=ORDERS, op="fwd", **extra):
    """{order: stats[N, 3] fp32} of the CUDA fwd_stats launcher run on the CPU (op="cpu_fwd":
    of the C++ CPU kernel, compiled into the driver)."""
    n, v = logits.shape
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _write(tmp / "logits.bin", logits)
        _write(tmp / "target.bin", target.to(torch.int64))
        _run(
            exe,
            tmp,
            dict(
                op=op,
                dtype=DTYPE_CODE[logits.dtype],
                N=n,
                V=v,
                vocab_start=vocab_start,
                misalign=misalign,
                **extra,
            ),
            orders,
        )
        return {o: _read(tmp / f"out_{o}.bin", torch.float32, (n, 3)) for o in orders}


def backward(
    exe,
    logits,
    target,
    lse,
    scale,
    vocab_start=0,
    inplace=False,
    misalign=0,
    gmisalign=0,
    orders=ORDERS,
    **extra,
):
    """{order: grad[N, V]} (logits dtype) of the CUDA backward launcher run on the CPU."""
    n, v = logits.shape
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _write(tmp / "logits.bin", logits)
        _write(tmp / "target.bin", target.to(torch.int64))
        _write(tmp / "lse.bin", lse.float())
        _write(tmp / "scale.bin", scale.float())
        _run(
            exe,
            tmp,
            dict(
                op="bwd",
                dtype=DTYPE_CODE[logits.dtype],
                N=n,
                V=v,
                vocab_start=vocab_start,
                misalign=misalign,
                gmisalign=gmisalign,
                inplace=inplace,
                **extra,
            ),
            orders,
        )
        return {o: _read(tmp / f"out_{o}.bin", logits.dtype, (n, v)) for o in orders}


def select(exe, scores, eligible, k, orders=ORDERS, issued=None, **extra):
    """{order: selected[G, n] bool} of the CUDA select launcher run on the CPU. ``k=None`` with
    ``ratio=R`` in ``extra``: the kernels derive each group's k. ``issued``: a dict that gets
    {order: (kernel launches, memsets)} of the call."""
    g, n = scores.shape
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _write(tmp / "scores.bin", scores.float())
        _write(tmp / "eligible.bin", eligible.bool())
        if k is not None:
            _write(tmp / "k.bin", k.to(torch.int64))
        _run(exe, tmp, dict(op="select", G=g, n=n, **extra), orders)
        if issued is not None:
            issued.update(_issued(tmp, orders))
        return {o: _read(tmp / f"out_{o}.bin", torch.bool, (g, n)) for o in orders}


def finalize(exe, stats, target, v_global, ref, mask, flags, orders=ORDERS, **extra):
    """{order: (loss, lse, score, eligible, selected, totals)} of the CUDA finalize launcher."""
    n = stats.shape[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _write(tmp / "stats.bin", stats.float())
        _write(tmp / "target.bin", target.to(torch.int64))
        if ref is not None:
            _write(tmp / "ref.bin", ref.float())
        if mask is not None:
            _write(tmp / "mask.bin", mask.bool())
        args = dict(op="finalize", N=n, v_global=v_global, flags=flags, has_ref=ref is not None)
        _run(exe, tmp, dict(args, has_mask=mask is not None, **extra), orders)
        out = {}
        for o in orders:
            raw = (tmp / f"out_{o}.bin").read_bytes()
            f = torch.frombuffer(bytearray(raw[: 12 * n]), dtype=torch.float32).view(3, n)
            u = torch.frombuffer(bytearray(raw[12 * n : 14 * n]), dtype=torch.uint8).view(2, n)
            totals = torch.frombuffer(bytearray(raw[14 * n :]), dtype=torch.float32)
            out[o] = (f[0], f[1], f[2], u[0].bool(), u[1].bool(), totals)
        return out


def add_top(exe, top, loss, selected, totals, orders=ORDERS, issued=None, **extra):
    """{order: (selected [N] bool, totals [8] fp32)} of the CUDA add_top launcher (both in/out:
    the inputs are not changed). ``issued``: as for :func:`select`."""
    n = loss.numel()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _write(tmp / "top.bin", top.bool())
        _write(tmp / "loss.bin", loss.float())
        _write(tmp / "selected.bin", selected.bool())
        _write(tmp / "totals.bin", totals.float())
        _run(exe, tmp, dict(op="add_top", N=n, **extra), orders)
        out = {}
        for o in orders:
            raw = (tmp / f"out_{o}.bin").read_bytes()
            sel = torch.frombuffer(bytearray(raw[:n]), dtype=torch.uint8).bool()
            out[o] = (sel, torch.frombuffer(bytearray(raw[n:]), dtype=torch.float32))
        if issued is not None:
            issued.update(_issued(tmp, orders))
        return out


def swiglu(exe, x, dy=None, misalign=0, orders=ORDERS, issued=None, **extra):
    """{order: y [rows, f]} of the CUDA SwiGLU forward launcher on ``x [rows, 2f]``; with ``dy``
    ``[rows, f]``, {order: dx [rows, 2f]} of the backward launcher."""
    rows, f = x.shape[0], x.shape[1] // 2
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _write(tmp / "x.bin", x)
        if dy is not None:
            _write(tmp / "dy.bin", dy.to(x.dtype))
        op = "swiglu_fwd" if dy is None else "swiglu_bwd"
        args = dict(op=op, dtype=DTYPE_CODE[x.dtype], rows=rows, f=f, misalign=misalign, **extra)
        _run(exe, tmp, args, orders)
        shape = (rows, f if dy is None else 2 * f)
        if issued is not None:
            issued.update(_issued(tmp, orders))
        if x.numel() == 0:  # nothing to read back (and no bytes to view as the dtype)
            return {o: torch.empty(shape, dtype=x.dtype) for o in orders}
        return {o: _read(tmp / f"out_{o}.bin", x.dtype, shape) for o in orders}


def rope(exe, x, cos, sin, backward=False, misalign=0, orders=ORDERS, issued=None, **extra):
    """{order: out [s, b, heads, d]} of the CUDA RoPE launcher on ``x [s, b, heads, d]`` (rows of
    one stride: contiguous, or a strided view such as the key of the QKV projection) with fp32
    ``cos``/``sin [s, d]``; ``backward``: the transposed rotation. ``issued``: filled with
    {order: (launches, memsets, blocks)}."""
    s, b, n, d = x.shape
    rows_view = x.reshape(-1, d)  # the kernel's [rows, d] (a view where the rows have one stride)
    rows, row_stride = rows_view.shape[0], rows_view.stride(0) if rows_view.numel() else d
    assert rows_view.stride(1) == 1 or rows_view.numel() == 0
    with tempfile.TemporaryDirectory() as dtmp:
        tmp = Path(dtmp)
        if rows:  # the elements the rows span, from the first row's start to the last's end
            span = rows_view.as_strided(((rows - 1) * row_stride + d,), (1,))
            _write(tmp / "x.bin", span)
        else:
            _write(tmp / "x.bin", x.new_empty(0))
        _write(tmp / "cos.bin", cos.float())
        _write(tmp / "sin.bin", sin.float())
        args = dict(
            op="rope",
            dtype=DTYPE_CODE[x.dtype],
            rows=rows,
            rows_per_position=max(b * n, 1),
            d=d,
            row_stride=row_stride,
            backward=backward,
            misalign=misalign,
            **extra,
        )
        _run(exe, tmp, args, orders)
        if issued is not None:
            issued.update(_issued(tmp, orders, with_blocks=True))
        if x.numel() == 0:
            return {o: torch.empty(x.shape, dtype=x.dtype) for o in orders}
        return {o: _read(tmp / f"out_{o}.bin", x.dtype, x.shape) for o in orders}
