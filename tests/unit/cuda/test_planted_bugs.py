"""The harness can fail: copies of csrc/cuda/selective_loss.cu with a planted synchronisation
bug must fail the same checks that the real source passes (tests in
test_selective_loss_cuda_host.py), either through the harness's own misuse report or through
wrong / thread-order-dependent results."""

from __future__ import annotations

import pytest
import torch

from megatron_slm.ops.selective_loss_reference import torch_select
from tests.unit.cuda import harness as H
from tests.unit.cuda import kernel_checks as K
from tests.unit.cuda.test_selective_loss_cuda_host import _same_for_all_orders

pytestmark = pytest.mark.skipif(not H.have_compiler(), reason="needs a C++ compiler")

BLOCK_REDUCE_BARRIER = """    ss[warp] = v.s;
  }
  __syncthreads();"""
HIST_ZERO_BARRIER = """    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
    __syncthreads();"""
WRITE_TILE_BARRIER = """      if (lane == 0) warp_counts[warp] = __popc(ballot);
      __syncthreads();"""
ROW_LOOP_BARRIER = "  __syncthreads();  // sm/ss are rewritten by the next row of this block"

PLANTS = {
    # name: (original, planted, op, extra driver arguments)
    "block_reduce_missing_barrier": (
        BLOCK_REDUCE_BARRIER,
        BLOCK_REDUCE_BARRIER.replace("__syncthreads();", ""),
        "fwd",
        {},
    ),
    "block_reduce_divergent_barrier": (
        BLOCK_REDUCE_BARRIER,
        BLOCK_REDUCE_BARRIER.replace("__syncthreads();", "if (warp < 4) __syncthreads();"),
        "fwd",
        {},
    ),
    "row_loop_missing_barrier": (ROW_LOOP_BARRIER, "", "fwd", {"max_grid": 3}),
    "select_hist_missing_barrier": (
        HIST_ZERO_BARRIER,
        HIST_ZERO_BARRIER.replace("__syncthreads();", ""),
        "select",
        {},
    ),
    "select_write_missing_barrier": (
        WRITE_TILE_BARRIER,
        WRITE_TILE_BARRIER.replace("__syncthreads();", ""),
        "select",
        {},
    ),
}


def _checks(exe, op, extra):
    """The checks of the real tests (fp32, scalar and vectorized rows; a 3-chunk selection)."""
    if op == "fwd":
        for v in (1000, 1001):
            x = K.logits(12, v, torch.float32, seed=v)
            t = K.targets(12, v, 0, seed=v)
            st = _same_for_all_orders(H.fwd_stats(exe, x, t, **extra))
            K.check_stats(st, x, t, 0, "cuda")
    else:
        scores, eligible = K.select_inputs(2, 20000, seed=1)
        k = torch.tensor([5000, 12345])
        got = _same_for_all_orders(H.select(exe, scores, eligible, k, **extra))
        assert torch.equal(got, torch_select(scores, eligible, k))


def test_the_real_source_passes_the_checks():
    for op, extra in (("fwd", {}), ("fwd", {"max_grid": 3}), ("select", {})):
        _checks(H.build(), op, extra)


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_bug_fails_the_checks(plant, tmp_path):
    original, planted, op, extra = PLANTS[plant]
    src = H.KERNELS.read_text()
    assert src.count(original) == 1, "the planting site moved: update the test"
    path = tmp_path / "selective_loss.cu"
    path.write_text(src.replace(original, planted))
    exe = H.build(kernels=path, name=f"driver-{plant}")
    with pytest.raises((AssertionError, H.DriverError)) as e:
        _checks(exe, op, extra)
    if "divergent" in plant:  # reported by the harness itself, not just a wrong result
        assert isinstance(e.value, H.DriverError) and "divergent __syncthreads" in e.value.stderr
