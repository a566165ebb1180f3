"""The harness can fail: copies of csrc/cuda/selective_loss.cu with a planted synchronisation
bug must fail the same checks that the real source passes (tests in
test_selective_loss_cuda_host.py), either through the harness's own misuse report or through
wrong / thread- or block-order-dependent results. Missing atomics (`+=` for atomicAdd) pass
every one-block-at-a-time order: they are planted in the race build and run in the adversarial
orders (blocks resident together, threads switching between a `+=`'s load and store)."""

from __future__ import annotations

import pytest
import torch

from megatron_slm.ops.selective_loss_reference import torch_add_top, torch_finalize, torch_select
from tests.unit.cuda import harness as H
from tests.unit.cuda import kernel_checks as K

pytestmark = pytest.mark.skipif(not H.have_compiler(), reason="needs a C++ compiler")

BLOCK_REDUCE_BARRIER = """    ss[warp] = v.s;
  }
  __syncthreads();"""
HIST_ZERO_BARRIER = """    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
    __syncthreads();"""
WRITE_TILE_BARRIER = """    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();"""
ONE_BLOCK_ZERO_BARRIER = """      for (int b = threadIdx.x; b < 256; b += blockDim.x) bins[b] = 0u;
      __syncthreads();"""
ROW_LOOP_BARRIER = "  __syncthreads();  // sm/ss are rewritten by the next row of this block"
# the shared histograms' add (both select paths): one per bin and warp, with the lanes' count
BINS_ATOMIC = "atomicAdd(&bins[bin], static_cast<unsigned int>(__popc(peers)));"
BINS_PLAIN_ADD = "bins[bin] += static_cast<unsigned int>(__popc(peers));"
GLOBAL_HIST_ATOMIC = "atomicAdd(&gh[i], static_cast<unsigned long long>(hist[i]));"
COUNT_SHUFFLE = (
    "for (int off = 16; off > 0; off >>= 1) count += __shfl_xor_sync(0xffffffffu, count, off);"
)
# The last block sums every block's partials itself, assuming that it runs last: right in
# ascending block order only (a GPU gives no such order; a ticket counter would be needed).
PARTIALS_WRITE = """a.partials[blockIdx.x * kSums + j] = red[j][0];
  }"""
LAST_BLOCK_SUMS = """
  __syncthreads();
  if (blockIdx.x == gridDim.x - 1 && static_cast<int>(threadIdx.x) <= kSums) {
    const int j = static_cast<int>(threadIdx.x) < kSums ? threadIdx.x : finalize::kBadTargets;
    double sum = 0.0;
    for (unsigned int b = 0; b < gridDim.x; ++b) sum += a.partials[b * kSums + j];
    a.totals[threadIdx.x] = j == static_cast<int>(threadIdx.x) ? static_cast<float>(sum)
                                                                : finalize::targets_ok(sum);
  }"""
TOTALS_LAUNCH = "SLM_LAUNCH(1, 32, 0, stream, finalize_totals_kernel)(partials, blocks, totals);"
ADD_TOP_BARRIER = """  red_sum[threadIdx.x] = sum;
  __syncthreads();"""

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
    "select_one_block_missing_barrier": (
        ONE_BLOCK_ZERO_BARRIER,
        ONE_BLOCK_ZERO_BARRIER.replace("__syncthreads();", ""),
        "select_one_block",
        {},
    ),
    # odd and even lanes meet at two shuffles with the same operation and mask
    "select_count_divergent_shuffle": (
        COUNT_SHUFFLE,
        "for (int off = 16; off > 0; off >>= 1) {\n"
        "      if (lane & 1) count += __shfl_xor_sync(0xffffffffu, count, off);\n"
        "      else count += __shfl_xor_sync(0xffffffffu, count, off);\n"
        "    }",
        "select",
        {},
    ),
    "add_top_missing_barrier": (
        ADD_TOP_BARRIER,
        ADD_TOP_BARRIER.replace("__syncthreads();", ""),
        "add_top",
        {},
    ),
    "finalize_block_order_dependence": (
        [
            (PARTIALS_WRITE, PARTIALS_WRITE + LAST_BLOCK_SUMS),
            (TOTALS_LAUNCH, "(void)partials;"),
        ],
        None,
        "finalize",
        {},
    ),
}
# Planted in the race build, checked in the adversarial orders.
RACE_PLANTS = {
    "select_shared_hist_plain_add": ((BINS_ATOMIC, BINS_PLAIN_ADD), "select"),
    "select_global_hist_plain_add": ((GLOBAL_HIST_ATOMIC, "gh[i] += hist[i];"), "select"),
    "select_one_block_plain_add": ((BINS_ATOMIC, BINS_PLAIN_ADD), "select_one_block"),
}


def _same(outs, orders):
    """The output of the first order, after checking that every order gave the same bits."""
    first = outs[orders[0]]
    for o in orders[1:]:
        for a, b in zip(first, outs[o]) if isinstance(first, tuple) else [(first, outs[o])]:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{orders[0]} vs {o}"
    return first


def _checks(exe, op, extra, orders=H.ORDERS):
    """The checks of the real tests (fp32, scalar and vectorized rows; a 3-chunk selection; groups
    of one chunk, one block each, k given and derived; the finalize sums over 12 blocks; the
    add_top block reduction), in every given order."""
    if op == "fwd":
        for v in (1000, 1001):
            x = K.logits(12, v, torch.float32, seed=v)
            t = K.targets(12, v, 0, seed=v)
            st = _same(H.fwd_stats(exe, x, t, orders=orders, **extra), orders)
            K.check_stats(st, x, t, 0, "cuda")
    elif op == "select":
        scores, eligible = K.select_inputs(2, 20000, seed=1)
        k = torch.tensor([5000, 12345])
        got = _same(H.select(exe, scores, eligible, k, orders=orders, **extra), orders)
        assert torch.equal(got, torch_select(scores, eligible, k))
    elif op == "select_one_block":
        scores, eligible = K.select_inputs(3, 3000, seed=2)
        k = torch.tensor([1000, 1, 2222])
        got = _same(H.select(exe, scores, eligible, k, orders=orders, **extra), orders)
        assert torch.equal(got, torch_select(scores, eligible, k))
        got = _same(H.select(exe, scores, eligible, None, orders=orders, ratio=0.6), orders)
        assert torch.equal(got, torch_select(scores, eligible, None, 0.6))
    elif op == "add_top":
        top, loss, kept, totals = K.add_top_inputs(3000, seed=4)
        sel, tot = _same(H.add_top(exe, top, loss, kept, totals, orders=orders, **extra), orders)
        want_sel, want_tot = kept.clone(), totals.clone()
        torch_add_top(top, loss, want_sel, want_tot)
        assert torch.equal(sel, want_sel)
        torch.testing.assert_close(tot, want_tot, rtol=2**-23, atol=0)
    else:
        n = 3000
        g = torch.Generator().manual_seed(3)
        stats = torch.stack(
            [
                torch.randn(n, generator=g),
                torch.rand(n, generator=g) + 1,
                torch.randn(n, generator=g),
            ],
            dim=1,
        ).contiguous()
        target, ref = torch.randint(-2, 102, (n,), generator=g), torch.randn(n, generator=g)
        mask = torch.rand(n, generator=g) < 0.7
        got = _same(
            H.finalize(exe, stats, target, 100, ref, mask, 3, orders=orders, **extra), orders
        )
        want = torch_finalize(stats, target, 100, ref, mask, 3)
        torch.testing.assert_close(got[5], want[5], rtol=2**-23, atol=0, equal_nan=True)


def test_the_real_source_passes_the_checks():
    for op, extra in (("fwd", {}), ("fwd", {"max_grid": 3}), ("select", {}),
                      ("select_one_block", {"max_grid": 2}), ("finalize", {}),
                      ("add_top", {})):  # fmt: skip
        _checks(H.build(), op, extra)


def test_the_real_source_passes_the_adversarial_orders():
    """Blocks resident together with their threads interleaved at atomics and memory accesses:
    the select kernels' histograms (shared and global atomics), the finalize partial sums, rows
    looping over a small grid."""
    exe = H.build(race=True, name="driver-race")
    for op, extra in (("fwd", {"max_grid": 3}), ("select", {}), ("select_one_block", {}),
                      ("finalize", {}), ("add_top", {})):  # fmt: skip
        _checks(exe, op, extra, orders=H.ADVERSARIAL)


def _planted(tmp_path, replacements):
    src = H.KERNELS.read_text()
    for original, planted in replacements:
        assert src.count(original) == 1, "the planting site moved: update the test"
        src = src.replace(original, planted)
    path = tmp_path / "selective_loss.cu"
    path.write_text(src)
    return path


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_bug_fails_the_checks(plant, tmp_path):
    original, planted, op, extra = PLANTS[plant]
    replacements = original if isinstance(original, list) else [(original, planted)]
    exe = H.build(kernels=_planted(tmp_path, replacements), name=f"driver-{plant}", quick=True)
    with pytest.raises((AssertionError, H.DriverError)) as e:
        _checks(exe, op, extra)
    if "divergent" in plant:  # reported by the harness itself, not just a wrong result
        assert isinstance(e.value, H.DriverError)
        kind = "shuffle" if "shuffle" in plant else "barrier"
        msg = "lanes disagree on a warp op" if kind == "shuffle" else "divergent __syncthreads"
        assert msg in e.value.stderr
    if "block_order" in plant:  # right in ascending block order: only the other orders see it
        _checks(exe, op, extra, orders=H.ORDERS[:1])


@pytest.mark.parametrize("plant", sorted(RACE_PLANTS))
def test_missing_atomic_fails_the_adversarial_orders(plant, tmp_path):
    """A `+=` for an atomicAdd loses updates once loads and stores are switch points and blocks
    overlap. (It passes every one-block-at-a-time order, where threads switch only at barriers
    and warp ops: test_simt_harness shows that on a plain `+=`.)"""
    replacement, op = RACE_PLANTS[plant]
    path = _planted(tmp_path, [replacement])
    exe = H.build(kernels=path, race=True, name=f"driver-race-{plant}")
    with pytest.raises(AssertionError):
        _checks(exe, op, {}, orders=H.ADVERSARIAL[:1])
