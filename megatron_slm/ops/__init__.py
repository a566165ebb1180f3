"""Fused ops of megatron-slm (C++/CUDA kernels with pure-PyTorch fallbacks)."""

from megatron_slm.ops.selective_loss import (
    SelectiveLossOutput,
    compiled_kernels_for,
    selective_cross_entropy,
    selective_loss_mean,
)

__all__ = [
    "SelectiveLossOutput",
    "compiled_kernels_for",
    "selective_cross_entropy",
    "selective_loss_mean",
]
