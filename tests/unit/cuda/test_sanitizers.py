"""The harness driver built with -fsanitize=address,undefined runs the CUDA kernels clean: no
out-of-bounds access (every buffer has its exact size), no undefined behaviour. Its outputs
equal the plain build's. A planted off-by-one shows that the instrumentation sees the kernels."""

from __future__ import annotations

import subprocess

import pytest
import torch

from tests.unit.cuda import harness as H
from tests.unit.cuda import kernel_checks as K


def _have_sanitizers() -> bool:
    if not H.have_compiler():
        return False
    p = subprocess.run(
        [H.CXX, *H.SANITIZE_FLAGS, "-x", "c++", "-", "-o", "/dev/null"],
        input="int main() { return 0; }",
        capture_output=True,
        text=True,
    )
    return p.returncode == 0


pytestmark = pytest.mark.skipif(not _have_sanitizers(), reason="no ASan/UBSan runtime")
ORDERS = H.ORDERS[:2]


@pytest.fixture(scope="module")
def exes():
    return H.build(), H.build(sanitize=True, name="driver-asan")


def _bits(t):
    return t.view(H._BITS[t.dtype]) if t.dtype in H._BITS else t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_clean_under_asan_ubsan(exes, dtype):
    plain, asan = exes
    esize = torch.tensor([], dtype=dtype).element_size()
    for v, misalign in ((1000, 0), (1001, 0), (1000, esize)):
        x = K.logits(12, v, dtype, seed=v)
        t = K.targets(12, v, 500, seed=v)
        a = H.fwd_stats(asan, x, t, 500, misalign=misalign, orders=ORDERS)
        b = H.fwd_stats(plain, x, t, 500, misalign=misalign, orders=ORDERS)
        assert all(torch.equal(_bits(a[o]), _bits(b[o])) for o in ORDERS)
        lse = torch.logsumexp(x.double(), dim=1).float()
        scale = torch.linspace(-1, 1, 12)
        scale[3] = 0
        for inplace in (False, True):
            kw = dict(
                vocab_start=500,
                inplace=inplace,
                misalign=misalign,
                gmisalign=misalign,
                orders=ORDERS,
            )
            a = H.backward(asan, x, t, lse, scale, **kw)
            b = H.backward(plain, x, t, lse, scale, **kw)
            assert all(torch.equal(_bits(a[o]), _bits(b[o])) for o in ORDERS)


def test_select_clean_under_asan_ubsan(exes):
    plain, asan = exes
    for n in (1, 1000, 3000, 20000):  # 20000: three blocks per group
        scores, eligible = K.select_inputs(6, n, seed=n)
        k = torch.tensor([1, int(eligible[1].sum()), 3, 0, n + 5, 2])
        if n > 8192:  # multi-block groups cost the most under ASan: k = n // 3, #eligible
            scores, eligible, k = scores[:2], eligible[:2], torch.tensor([n // 3, int(k[1])])
        a = H.select(asan, scores, eligible, k, orders=ORDERS)
        b = H.select(plain, scores, eligible, k, orders=ORDERS)
        assert all(torch.equal(a[o], b[o]) for o in ORDERS)


def test_unrolled_rows_and_finalize_clean_under_asan_ubsan(exes):
    plain, asan = exes
    x = K.logits(8, 6000, torch.bfloat16, seed=2)  # long rows: the 2-vector unrolled loop
    t = K.targets(8, 6000, 0, seed=2)
    lse = torch.logsumexp(x.double(), dim=1).float()
    for run in (
        lambda exe: H.fwd_stats(exe, x, t, orders=ORDERS),
        lambda exe: H.backward(exe, x, t, lse, torch.ones(8), inplace=True, orders=ORDERS),
    ):
        a, b = run(asan), run(plain)
        assert all(torch.equal(_bits(a[o]), _bits(b[o])) for o in ORDERS)
    n = 3000
    stats = torch.stack([torch.randn(n), torch.rand(n) + 1, torch.randn(n)], dim=1).contiguous()
    target, ref, mask = torch.randint(-2, 102, (n,)), torch.randn(n), torch.rand(n) < 0.7
    a = H.finalize(asan, stats, target, 100, ref, mask, 3, orders=ORDERS)
    b = H.finalize(plain, stats, target, 100, ref, mask, 3, orders=ORDERS)
    for o in ORDERS:
        assert all(
            torch.equal(p.view(torch.uint8), q.view(torch.uint8)) for p, q in zip(a[o], b[o])
        )


def test_asan_sees_a_planted_overrun(tmp_path):
    src = H.KERNELS.read_text()
    loop = "for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {\n        const float f"
    assert src.count(loop) == 1
    planted = tmp_path / "selective_loss.cu"
    planted.write_text(src.replace(loop, loop.replace("i < V", "i <= V")))
    exe = H.build(kernels=planted, sanitize=True, name="driver-asan-planted")
    x = K.logits(3, 1001, torch.float32, seed=0, special=False)
    with pytest.raises(H.DriverError) as e:
        H.fwd_stats(exe, x, torch.zeros(3, dtype=torch.int64), orders=ORDERS[:1])
    assert "heap-buffer-overflow" in e.value.stderr
