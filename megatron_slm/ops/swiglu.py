"""Fused SwiGLU: ``silu(x[..., :f]) * x[..., f:]`` in one pass forward and one pass backward.

Megatron-core without Transformer Engine or Apex runs SwiGLU as tensor ops (split, ``silu``,
multiply; five more backward), each a pass over the ``[tokens, ffn]`` activations, and keeps
``silu`` of the gate half for the backward. The compiled kernels (``csrc/swiglu.cpp``,
``csrc/cuda/swiglu.cu``) read ``x`` once and write the output once, compute in fp32 with one
rounding to ``x``'s dtype, and keep only ``x`` for the backward. :func:`swiglu` runs them on
CUDA tensors; on the CPU, and without them (no ``megatron_slm._C``, or no CUDA kernels), it is
megatron-core's expression, :func:`swiglu_reference`: torch's CPU ops run ``silu`` on SIMD
vectors, and the C++ kernel's scalar ``exp`` loop took 1.5x their time (fwd+bwd of [2048, 2 x
1408] fp32 on 2 cores, ``benchmarks/bench_swiglu.py``). ``impl="fused"`` runs the C++ kernels on
the CPU (tests hold them, and the CUDA kernels on the CPU harness, to the same float64 rule).

``x`` is one tensor-parallel rank's ``linear_fc1`` output: megatron-core stores each rank's gate
and linear halves side by side (``apply_swiglu_sharded_factory``), so the split is per rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_slm import _extension

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the CUDA kernels' dtypes


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    """Megatron-core's unfused SwiGLU (``MLP.forward``'s ``glu``), differentiable by autograd."""
    gate, linear = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * linear


def has_swiglu_kernels(device: torch.device) -> bool:
    """Whether ``megatron_slm._C`` has SwiGLU kernels for tensors on ``device``."""
    if not _extension.HAS_C or not hasattr(_extension._C, "swiglu_forward"):
        return False  # an extension built before the op existed
    device = torch.device(device)
    return device.type == "cpu" or (device.type == "cuda" and _extension.HAS_CUDA_KERNELS)


def fused_swiglu_available(device: torch.device) -> bool:
    """Whether :func:`swiglu` (``impl="auto"``) runs the fused kernels on ``device``: CUDA."""
    return torch.device(device).type == "cuda" and has_swiglu_kernels(device)


class _FusedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x)  # only the input: the backward recomputes the sigmoid
        return _extension._C.swiglu_forward(x)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward raises, not a wrong grad
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _extension._C.swiglu_backward(dy.contiguous(), x)


def swiglu(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``silu(x[..., :f]) * x[..., f:]`` for ``x [..., 2f]``. ``impl``: ``auto`` (fused on CUDA
    where compiled, else the reference), ``fused`` (the compiled kernels, CPU or CUDA; an error
    where there are none), ``torch`` (the reference)."""
    if impl not in ("auto", "fused", "torch"):
        raise ValueError(f"swiglu: impl must be auto, fused or torch, got {impl!r}")
    if impl == "fused":
        if not has_swiglu_kernels(x.device):
            raise RuntimeError(f"swiglu: megatron_slm._C has no SwiGLU kernels for {x.device}")
        return _FusedSwiGLU.apply(x)
    if impl == "auto" and fused_swiglu_available(x.device) and x.dtype in _FUSED_DTYPES:
        return _FusedSwiGLU.apply(x)
    return swiglu_reference(x)
