"""The selective op issues no host synchronisation on a GPU: forward and backward of the mean
loss run under ``set_sync_debug_mode("error")`` (tests/gpu/conftest.py), at ratio 1 and 0.6, in
place and not, and under tests/sync_counter.py's counter (which sees the Python-level reads of
the calling thread); the CUDA runtime's check also covers the autograd thread. The values are
then checked outside the guard."""

from __future__ import annotations

import pytest
import torch

from megatron_slm import _extension
from megatron_slm.ops import selective_cross_entropy, selective_loss_mean
from megatron_slm.ops.selective_loss_reference import reference_selective_cross_entropy
from tests.sync_counter import SyncCounter

pytestmark = pytest.mark.gpu

needs_kernels = pytest.mark.skipif(
    not _extension.HAS_CUDA_KERNELS, reason="megatron_slm._C built without CUDA kernels"
)


def _inputs(dtype, s=128, b=4, v=32000):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(s, b, v, generator=g) * 3).to(dtype)
    target = torch.randint(0, v, (s, b), generator=g)
    ref = torch.rand(s, b, generator=g) * 5
    ref[0] = float("nan")  # unscored first tokens
    mask = torch.ones(s, b)
    mask[-5:, 1] = 0
    return logits.cuda(), target.cuda(), ref.cuda(), mask.cuda()


def _step(logits, target, ref, mask, ratio, scope, inplace, impl="cuda"):
    """What the trainer does with the op: fwd, mean over the selected tokens, bwd."""
    x = logits.clone().requires_grad_()
    out = selective_cross_entropy(
        x * 1.0,  # a non-leaf, as the output layer's logits are (the in-place grad overwrites it)
        target,
        ref_loss=ref,
        loss_mask=mask,
        ratio=ratio,
        scope=scope,
        impl=impl,
        inplace_backward=inplace,
    )
    selective_loss_mean(out).backward()
    return out, x.grad


def test_sync_debug_mode_catches_a_sync(no_host_sync):
    """The detector itself: a read-back inside the guard raises."""
    t = torch.ones(4, device="cuda")
    with no_host_sync(), pytest.raises(RuntimeError, match="synchroniz"):
        t.sum().item()
    assert t.sum().item() == 4.0  # outside, the mode is restored


@needs_kernels
@pytest.mark.parametrize("ratio", [1.0, 0.6])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("scope", ["microbatch", "sequence"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fwd_bwd_without_host_sync(no_host_sync, ratio, inplace, scope, dtype):
    logits, target, ref, mask = _inputs(dtype)
    _check_without_host_sync(no_host_sync, logits, target, ref, mask, ratio, scope, inplace)


@pytest.mark.parametrize("ratio", [1.0, 0.6])
def test_torch_fallback_without_host_sync(no_host_sync, ratio):
    """The pure-PyTorch kernels (a GPU job without the CUDA build) are sync-free too."""
    logits, target, ref, mask = _inputs(torch.float32)
    _check_without_host_sync(
        no_host_sync, logits, target, ref, mask, ratio, "microbatch", False, impl="torch"
    )


def _check_without_host_sync(no_host_sync, logits, target, ref, mask, ratio, scope, inplace,
                             impl="cuda"):  # fmt: skip
    dtype = logits.dtype
    # one call outside the guard first: lazy one-time set-up (kernel loading, allocator
    # segments) is not a per-step cost; every later call is what a training step pays
    _step(logits, target, ref, mask, ratio, scope, inplace, impl)
    with no_host_sync(), SyncCounter() as counter:
        out, grad = _step(logits, target, ref, mask, ratio, scope, inplace, impl)
    assert counter.count == 0, counter.report()

    # the values, outside the guard, as test_selective_loss_cuda.py checks them: the selection
    # against the pure-PyTorch kernels on CPU, loss and gradient against the reference
    cpu_sel = selective_cross_entropy(
        logits.cpu(),
        target.cpu(),
        ref_loss=ref.cpu(),
        loss_mask=mask.cpu(),
        ratio=ratio,
        scope=scope,
        impl="torch",
    ).selected
    assert torch.equal(out.selected.cpu(), cpu_sel)
    xr = logits.float().clone().requires_grad_()
    lr, sr = reference_selective_cross_entropy(
        xr, target, ref_loss=ref, loss_mask=mask, ratio=ratio, scope=scope, selected=out.selected
    )
    ((lr * sr).sum() / sr.sum()).backward()
    torch.testing.assert_close(out.loss, lr.detach(), rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), xr.grad.to(dtype).float(), rtol=tol, atol=1e-5)
    assert torch.all(grad[~out.selected] == 0)
