"""The CPU harness of the CUDA kernels (csrc/cuda/testing/simt_host.h) itself: warp exchanges
give the hardware's results, and misuse that a GPU would punish fails the launch."""

from __future__ import annotations

import subprocess

import pytest

from tests.unit.cuda import harness as H

pytestmark = pytest.mark.skipif(not H.have_compiler(), reason="needs a C++ compiler")


@pytest.fixture(scope="module")
def selftest():
    return H.build(driver=H.TESTING / "simt_selftest.cpp", kernels=None, name="selftest")


@pytest.fixture(scope="module")
def selftest_race():
    return H.build(
        driver=H.TESTING / "simt_selftest.cpp", kernels=None, name="selftest-race", race=True
    )


def _run(exe, case, order="forward"):
    p = subprocess.run([str(exe), case, order], capture_output=True, text=True)
    assert p.returncode in (0, 3), p.stderr
    return p.returncode, p.stdout.strip()


def _values(out):
    return [int(x) for x in out.split()]


@pytest.mark.parametrize("order", H.ORDERS)
def test_warp_exchanges_match_cuda_semantics(selftest, order):
    rc, out = _run(selftest, "shuffles", order)
    assert rc == 0
    v = _values(out)
    ballot = sum(1 << t for t in range(32) if t % 3 == 0)
    for t in range(32):
        assert v[4 * t] == (t ^ 5) * 10  # __shfl_xor_sync
        assert v[4 * t + 1] == (t + 3) * 10 if t + 3 < 32 else t * 10  # __shfl_down_sync
        assert v[4 * t + 2] == ballot
        # __match_any_sync of t % 5 - 1 (a negative value too): the lanes of the same residue
        assert v[4 * t + 3] == sum(1 << u for u in range(32) if u % 5 == t % 5)


@pytest.mark.parametrize("order", H.ORDERS)
def test_atomics_and_barriers_per_block(selftest, order):
    rc, out = _run(selftest, "block_sum", order)
    assert rc == 0
    assert _values(out) == [sum(range(256)) + 256 * 1000 * b for b in range(3)]


def test_barrier_publishes_shared_memory(selftest):
    expected = [7] * 64 + [8] * 64
    for order in H.ORDERS:
        assert _values(_run(selftest, "publish", order)[1]) == expected


def test_missing_barrier_is_exposed_by_thread_order(selftest):
    # Without the barrier the readers see the 0xFF-poisoned shared word unless thread 0 ran first.
    outs = {o: _values(_run(selftest, "publish_race", o)[1]) for o in H.ORDERS}
    assert outs["forward"] == [7] * 64 + [8] * 64
    assert outs["reverse"] != outs["forward"]
    assert 0xFFFFFFFF in outs["reverse"]


def test_shared_memory_is_poisoned_before_each_block(selftest):
    assert _values(_run(selftest, "shared_poison")[1]) == [0xFFFFFFFF] * 32


@pytest.mark.parametrize(
    "case, message",
    [
        ("divergent_barrier", "divergent __syncthreads"),
        ("exited_before_barrier", "not reached by 1 threads"),
        ("shuffle_with_exited_lane", "which has exited"),
        ("deadlock", "deadlock"),
        ("divergent_shuffle", "lanes disagree on a warp op"),
        ("grid_too_large", "invalid launch configuration: grid (5,1,1)"),
        ("block_too_large", "invalid launch configuration"),
    ],
)
def test_misuse_fails_the_launch(selftest, case, message):
    for order in H.ORDERS:
        rc, out = _run(selftest, case, order)
        assert rc == 3 and message in out, out


def test_blocks_run_in_forward_reverse_and_seeded_random_order(selftest):
    """out[1 + i]: the i-th block to start (thread 0 of each block takes a ticket)."""
    starts = {o: _values(_run(selftest, "block_order", o)[1]) for o in H.ORDERS}
    assert all(v[0] == 16 for v in starts.values())
    assert starts["forward"][1:] == list(range(16))
    assert starts["reverse"][1:] == list(range(15, -1, -1))
    rand = starts[H.ORDERS[2]][1:]
    assert sorted(rand) == list(range(16)) and rand not in (
        starts["forward"][1:],
        starts["reverse"][1:],
    )
    assert _values(_run(selftest, "block_order", "random:7")[1])[1:] != rand  # seeded


@pytest.mark.parametrize("where", ["shared", "global"])
def test_adversarial_orders_lose_the_updates_of_a_plain_add(selftest, selftest_race, where):
    """`x += v` where an atomicAdd is needed: exact one block at a time with switches only at
    barriers (every order of the plain build), short in the adversarial orders of the race build
    (loads and stores are switch points, blocks overlap); atomicAdd stays exact there."""
    want = [sum(range(256)) + 256 * 1000 * b for b in range(3)] if where == "shared" else [512]
    for order in H.ORDERS:
        assert _values(_run(selftest, f"{where}_plain_add", order)[1]) == want
    for order in H.ADVERSARIAL:
        lost = _values(_run(selftest_race, f"{where}_plain_add", order)[1])
        assert all(a < b for a, b in zip(lost, want)), (order, lost)
        assert _values(_run(selftest_race, f"{where}_atomic_add", order)[1]) == want


def test_adversarial_order_needs_the_race_build(selftest):
    p = subprocess.run([str(selftest), "block_sum", H.ADVERSARIAL[0]], capture_output=True)
    assert p.returncode == 1
