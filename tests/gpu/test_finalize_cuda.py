"""The finalize kernel on a GPU: the same bits as the C++ kernel (both compile
csrc/selective_loss_finalize.h) for loss, lse, score and the flags; the statistics' double sums
in another order, rounded once (skipped without CUDA, like every test in tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from megatron_slm import _extension
from megatron_slm.ops.selective_loss_reference import (
    FINALIZE_KEEP_UNSCORED,
    FINALIZE_RANK_EXCESS,
    FINALIZE_SELECT_ALL,
)

pytestmark = pytest.mark.gpu

needs_kernels = pytest.mark.skipif(
    not _extension.HAS_CUDA_KERNELS, reason="megatron_slm._C built without CUDA kernels"
)


@needs_kernels
@pytest.mark.parametrize("n", [1, 37, 8192, 100_000])
@pytest.mark.parametrize(
    "flags", [FINALIZE_RANK_EXCESS | FINALIZE_KEEP_UNSCORED | FINALIZE_SELECT_ALL, 0]
)
def test_finalize_matches_cpp(n, flags):
    g = torch.Generator().manual_seed(n)
    stats = torch.stack(
        [torch.randn(n, generator=g) * 3, torch.rand(n, generator=g) * 50 + 0.5,
         torch.randn(n, generator=g)], dim=1,
    ).contiguous()  # fmt: skip
    stats[0, 1] = float("nan")
    target = torch.randint(-1, 101, (n,), generator=g)
    ref = torch.rand(n, generator=g) * 6
    ref[: max(1, n // 10)] = float("nan")
    mask = torch.rand(n, generator=g) < 0.8
    C = _extension._C
    cpu = C.selective_loss_finalize(stats, target, 100, ref, mask, flags)
    gpu = C.selective_loss_finalize(
        stats.cuda(), target.cuda(), 100, ref.cuda(), mask.cuda(), flags
    )
    gpu = [t.cpu() for t in gpu]
    for i in range(3):  # bitwise, NaN where NaN (the device writes its canonical NaN bits)
        nan = torch.isnan(cpu[i])
        assert torch.equal(nan, torch.isnan(gpu[i])), i
        assert torch.equal(cpu[i][~nan].view(torch.int32), gpu[i][~nan].view(torch.int32)), i
    assert torch.equal(cpu[3], gpu[3]) and torch.equal(cpu[4], gpu[4])
    torch.testing.assert_close(gpu[5], cpu[5], rtol=2**-23, atol=0, equal_nan=True)
