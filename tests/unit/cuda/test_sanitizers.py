"""The harness driver built with -fsanitize=address,undefined,float-cast-overflow runs the CUDA
kernels and the C++ CPU kernels clean: no out-of-bounds access (every buffer has its exact
size), no undefined behaviour. Its outputs equal the plain build's. Planted bugs show that the
instrumentation sees the kernels: an off-by-one (ASan), a misaligned vector load (UBSan), a NaN
converted to int (float-cast-overflow, which GCC's "undefined" leaves out).

The sanitizers cannot vanish silently: in CI (MEGATRON_SLM_CI or CI set, as .ci/run does) a
missing runtime fails test_sanitizer_runtimes_present; elsewhere the module skips, saying why."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from tests.unit.cuda import harness as H
from tests.unit.cuda import kernel_checks as K


def _in_ci() -> bool:
    flag = os.environ.get("MEGATRON_SLM_CI") or os.environ.get("CI") or ""
    return flag.lower() not in ("", "0", "false", "no")


def _sanitizer_problem() -> str | None:
    """Why no sanitized program can be built and run here, or None."""
    if not H.have_compiler():
        return f"no C++ compiler ({H.CXX})"
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "probe"
        p = subprocess.run(
            [H.CXX, *H.SANITIZE_FLAGS, "-x", "c++", "-", "-o", str(exe)],
            input="int main() { return 0; }",
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            return f"no ASan/UBSan runtime for {H.CXX}: {p.stderr.strip()[-300:]}"
        p = subprocess.run([str(exe)], capture_output=True, text=True)
        if p.returncode != 0:
            return f"a sanitized program does not run here: {p.stderr.strip()[-300:]}"
    return None


PROBLEM = _sanitizer_problem()
pytestmark = pytest.mark.skipif(
    PROBLEM is not None and not _in_ci(), reason=f"{PROBLEM} (outside CI: skipped)"
)
ORDERS = H.ORDERS[:2]


def test_sanitizer_runtimes_present():
    assert PROBLEM is None, PROBLEM


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_clean_under_asan_ubsan(exes, dtype):
    """Both paths (vectors; a misaligned buffer or an odd width: one value per thread), with NaN
    and infinities (UBSan's float-cast-overflow would catch a conversion out of range)."""
    plain, asan = exes
    esize = torch.tensor([], dtype=dtype).element_size()
    for rows, f, misalign in ((5, 64, 0), (4, 32, esize), (4, 13, esize)):
        x = torch.randn(rows, 2 * f, generator=torch.Generator().manual_seed(f)) * 50
        x[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        x, dy = x.to(dtype), torch.randn(rows, f).to(dtype)
        for grad in (None, dy):
            a = H.swiglu(asan, x, grad, misalign=misalign, orders=ORDERS)
            b = H.swiglu(plain, x, grad, misalign=misalign, orders=ORDERS)
            for o in ORDERS:  # the same bits, but a NaN's sign may differ between -O1 and -O2
                nan = a[o].isnan()
                assert torch.equal(nan, b[o].isnan())
                assert torch.equal(_bits(a[o])[~nan], _bits(b[o])[~nan])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_clean_under_asan_ubsan(exes, dtype):
    """Both paths (vectors; a misaligned buffer or a small head: one pair per thread) and strided
    rows, each buffer exactly as long as the rows it spans, with NaN and infinities."""
    plain, asan = exes
    esize = torch.tensor([], dtype=dtype).element_size()
    for s, heads, d, misalign, strided in (
        (4, 3, 64, 0, False),
        (3, 2, 32, esize, False),
        (3, 2, 6, 0, False),
        (4, 2, 64, 0, True),
    ):
        x = torch.randn(s, 2, heads, 3 * d if strided else d, generator=torch.Generator()) * 50
        x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        x = x.to(dtype)[..., d : 2 * d] if strided else x.to(dtype)
        angles = torch.rand(s, d) * 1000
        cos, sin = torch.cos(angles), torch.sin(angles)
        for backward in (False, True):
            a = H.rope(asan, x, cos, sin, backward, misalign=misalign, orders=ORDERS)
            b = H.rope(plain, x, cos, sin, backward, misalign=misalign, orders=ORDERS)
            for o in ORDERS:  # the same bits, but a NaN's sign may differ between -O1 and -O2
                nan = a[o].isnan()
                assert torch.equal(nan, b[o].isnan())
                assert torch.equal(_bits(a[o])[~nan], _bits(b[o])[~nan])


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


def test_unrolled_rows_finalize_and_add_top_clean_under_asan_ubsan(exes):
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
    top, loss, kept, totals = K.add_top_inputs(n, seed=5, nan_at="other")
    a = H.add_top(asan, top, loss, kept, totals, orders=ORDERS)
    b = H.add_top(plain, top, loss, kept, totals, orders=ORDERS)
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


def test_ubsan_sees_a_planted_misaligned_load(tmp_path):
    """The forward launcher without its pointer-alignment test: 16-byte vector loads from logits
    4 bytes off a 16-byte boundary."""
    src = H.KERNELS.read_text()
    check = "const bool vec = (reinterpret_cast<uintptr_t>(logits) % 16 == 0) &&\n"
    check += "                   ((V * static_cast<int64_t>(sizeof(T))) % 16 == 0);"
    assert src.count(check) == 1, "the planting site moved: update the test"
    planted = tmp_path / "selective_loss.cu"
    planted.write_text(src.replace(check, "const bool vec = (V * sizeof(T)) % 16 == 0;"))
    exe = H.build(kernels=planted, sanitize=True, name="driver-ubsan-planted", quick=True)
    x = K.logits(3, 1000, torch.float32, seed=0, special=False)
    with pytest.raises(H.DriverError) as e:
        H.fwd_stats(exe, x, torch.zeros(3, dtype=torch.int64), misalign=4, orders=ORDERS[:1])
    assert "misaligned address" in e.value.stderr and e.value.returncode == 67


def _nan_rows(dtype):
    x = K.logits(12, 1000, dtype, seed=4)  # rows 1, 2: a NaN; row 5: +inf
    x[7, -1] = K.NAN  # the last entry: past the vectorized lanes of the CPU max
    x[8] = K.NAN
    return x, K.targets(12, 1000, 0, seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_clean_on_nan_rows(exes, dtype):
    """The C++ row kernel's exp of NaN (logit - max) stays defined; its stats follow the rule."""
    _, asan = exes
    x, t = _nan_rows(dtype)
    st = H.fwd_stats(asan, x, t, op="cpu_fwd", orders=ORDERS[:1])[ORDERS[0]]
    K.check_stats(st, x, t, 0, "cpu kernel under sanitizers")


def test_float_cast_sanitizer_sees_a_planted_nan_cast(tmp_path):
    """fast_exp with the float -> int32 conversion it used to have: NaN logits reach it."""
    hdr = (H.CSRC / "selective_loss_kernels.h").read_text()
    defined = "const uint32_t e = float_to_bits(n + 12582912.0f) - 0x4B400000u + 127u;"
    assert hdr.count(defined) == 1, "the planting site moved: update the test"
    (tmp_path / "selective_loss_kernels.h").write_text(
        hdr.replace(
            defined, "const uint32_t e = static_cast<uint32_t>(static_cast<int32_t>(n) + 127);"
        )
    )
    exe = H.build(sanitize=True, include_first=tmp_path, name="driver-cast-planted", quick=True)
    x, t = _nan_rows(torch.float32)
    with pytest.raises(H.DriverError) as e:
        H.fwd_stats(exe, x, t, op="cpu_fwd", orders=ORDERS[:1])
    assert "outside the range of representable values" in e.value.stderr
