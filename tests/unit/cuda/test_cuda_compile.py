"""Checks of the real CUDA compilation (nvcc, no GPU needed); skipped without nvcc."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.unit.cuda import harness as H

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc")

# Block size each kernel is launched with (kThreads / kSelectThreads / kFinalizeThreads /
# kAddTopThreads in the .cu; the totals kernel is one warp).
LAUNCH_THREADS = {
    "fwd_stats_kernel": 256,
    "backward_kernel": 256,
    "select_pick_kernel": 256,
    "select_hist_kernel": 1024,
    "select_count_kernel": 1024,
    "select_write_kernel": 1024,
    "select_one_block_kernel": 512,
    "finalize_rows_kernel": 256,
    "finalize_totals_kernel": 32,
    "add_top_kernel": 512,
    "swiglu_forward_kernel": 256,  # kSwigluThreads in swiglu.cu
    "swiglu_backward_kernel": 256,
    "rope_kernel": 256,  # kRopeThreads in rope.cu
}


def test_every_kernel_declares_its_launch_bounds(tmp_path):
    """Bug 9: without __launch_bounds__ ptxas may use more registers than a 1024-thread block
    can have, and the launch (not the build) fails. With them, PTX carries .maxntid."""
    text = ""
    for source in (H.KERNELS, H.SWIGLU_KERNELS, H.ROPE_KERNELS):
        ptx = tmp_path / f"{source.stem}.ptx"
        subprocess.run(
            [
                NVCC,
                "-ptx",
                "-std=c++17",
                "-O3",
                "--use_fast_math",
                f"-I{H.CSRC}",
                "-arch=sm_80",
                str(source),
                "-o",
                str(ptx),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        text += ptx.read_text()
    assert sum(k in text for k in LAUNCH_THREADS) == len(LAUNCH_THREADS)
    entries = re.findall(r"\.entry\s+(\S+?)\(.*?\)\s*(\.maxntid\s+(\d+), 1, 1)?", text, re.S)
    assert entries, "no kernels in the PTX"
    for name, _, maxntid in entries:
        kind = next(k for k in LAUNCH_THREADS if k in name)
        assert maxntid, f"{name} has no __launch_bounds__"
        assert int(maxntid) == LAUNCH_THREADS[kind], name
