"""Fused ops of megatron-slm (C++/CUDA kernels with pure-PyTorch fallbacks)."""

from megatron_slm.ops.selective_loss import (
    SelectiveLossOutput,
    selective_cross_entropy,
    selective_loss_mean,
)

__all__ = ["SelectiveLossOutput", "selective_cross_entropy", "selective_loss_mean"]
