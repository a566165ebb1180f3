"""The header of RESULTS_gpu.md: date, commit, device, driver and versions, as markdown.

    python benchmarks/gpu/env_info.py

Every value is read on the machine that runs it; what cannot be read says so ("not installed",
"unknown") instead of failing, so the header is written even on a half-broken machine.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

import torch

PACKAGES = ("torch", "triton", "megatron-core", "liger-kernel", "transformer-engine", "numpy")


def _cmd(*args: str) -> str:
    """First line of a command's output, or 'unknown'."""
    if shutil.which(args[0]) is None:
        return "unknown"
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return lines[0] if lines else "unknown"


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvcc() -> str:
    """'13.0, V13.0.88' from nvcc's 'Cuda compilation tools, release ...' line."""
    line = _cmd("sh", "-c", "nvcc --version | grep release")
    return line.split("release", 1)[1].strip() if "release" in line else "not found"


def rows() -> list[tuple[str, str]]:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = _cmd("git", "rev-parse", "--short=12", "HEAD")
    if commit != "unknown":
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        commit += " + uncommitted changes" if dirty else ""
    out = [("date", now), ("commit", commit)]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.append(
            (
                "device",
                f"{p.name}, {p.multi_processor_count} SMs, "
                f"{p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}",
            )
        )
        out.append(
            ("driver", _cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"))
        )
    else:
        out.append(("device", "no CUDA device visible to torch"))
    out.append(("CUDA", f"torch built with {torch.version.cuda}; nvcc {_nvcc()}"))
    out.append(("python", platform.python_version()))
    out += [(pkg, _version(pkg)) for pkg in PACKAGES]
    out.append(("host", f"{platform.machine()}, {_cpu_count()} CPUs"))
    return out


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main() -> int:
    print("| | |\n|---|---|")
    for key, value in rows():
        print(f"| {key} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
