"""Fused rotary position embedding: megatron-core's non-interleaved RoPE in one pass each way.

Megatron-core without Transformer Engine applies RoPE (``_apply_rotary_pos_emb_bshd``) to the
query and the key as tensor ops: a multiply, ``rotate_half`` (a negation and a concatenation), a
second multiply, an add and a last concatenation, each a pass over ``[s, b, heads, d]``, and as
many backward. The compiled kernel (``csrc/rope.cpp``, ``csrc/cuda/rope.cu``) reads each row once
(the key, a strided view of the QKV projection's output, in place) and writes it once, in fp32
with one rounding (megatron-core rounds ``cos``/``sin`` and each product to the input's dtype).
The backward is the same kernel with the rotation transposed and saves nothing but the
``cos``/``sin`` tables, which are computed once per ``freqs`` tensor (megatron-core caches its
``rotary_pos_emb`` per length, so the layers of a model share one pair).

:func:`apply_rope` runs the kernel wherever ``megatron_slm._C`` has it, the CPU included (unlike the
fused SwiGLU: there is no transcendental function in the loop, and forward + backward of a
``[512, 2, 32, 64]`` query with its key took 0.32x megatron-core's time in fp32 and 0.29x in bf16
on 2 cores, ``benchmarks/bench_rope.py``); without it, and for calls the kernel does not cover
(a partial rotation, per-sample angles), it is megatron-core's expression, :func:`rope_reference`.
"""

from __future__ import annotations

import collections
import threading
import weakref

import torch

from megatron_slm import _extension

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the CUDA kernel's dtypes


def rope_reference(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """megatron-core's unfused, non-interleaved RoPE (``_apply_rotary_pos_emb_bshd`` with
    ``mscale`` 1): ``t [s, b, heads, d]``, ``freqs [s, 1, 1, rot]`` (``rot <= d``; the rest of
    ``d`` passes through). Differentiable by autograd."""
    rot = freqs.shape[-1]
    t, t_pass = t[..., :rot], t[..., rot:]
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return torch.cat((t * cos + torch.cat((-x2, x1), dim=-1) * sin, t_pass), dim=-1)


def has_rope_kernels(device: torch.device) -> bool:
    """Whether ``megatron_slm._C`` has the RoPE kernel for tensors on ``device``."""
    if not _extension.HAS_C or not hasattr(_extension._C, "rope"):
        return False  # an extension built before the op existed
    device = torch.device(device)
    return device.type == "cpu" or (device.type == "cuda" and _extension.HAS_CUDA_KERNELS)


def fused_rope_applies(t: torch.Tensor, freqs: torch.Tensor) -> bool:
    """Whether the kernel computes this call: ``t [s, b, heads, d]`` with ``freqs [s, 1, 1, d]``
    on its device (the whole head dimension rotated, one angle per position; angles that need no
    gradient)."""
    return (
        t.dim() == 4
        and freqs.dim() == 4
        and freqs.shape == (t.shape[0], 1, 1, t.shape[3])
        and t.shape[3] > 0
        and t.shape[3] % 2 == 0
        and freqs.device == t.device
        and freqs.is_floating_point()
        and not freqs.requires_grad
    )


class _Tables:
    """fp32 ``cos``/``sin`` ``[s, d]`` of the last few ``freqs`` tensors, keyed by the memory they
    view (a detached copy of ``rotary_pos_emb``, which activation recompute hands each layer,
    finds the same tables) and their version counter, which views share (an in-place change
    misses; inference tensors have none: by memory alone, as megatron-core's own cache of
    ``rotary_pos_emb`` per length). A weak reference to the first tensor keeps an entry valid:
    once it is gone, its memory may hold other angles. The tables are ordinary tensors even when
    made in inference mode (the scorer's), so that a training step may save them for its
    backward."""

    def __init__(self, size: int = 8):
        self._size = size
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(freqs: torch.Tensor) -> tuple:
        memory = (freqs.untyped_storage().data_ptr(), freqs.storage_offset())
        return (freqs.device, freqs.dtype, *memory, tuple(freqs.shape), tuple(freqs.stride()))

    def __call__(self, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._key(freqs)
        version = None if freqs.is_inference() else freqs._version
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0]() is not None and hit[1] == version:
                self._cache.move_to_end(key)
                return hit[2]
        with torch.inference_mode(False):
            f = freqs.detach().float().reshape(freqs.shape[0], freqs.shape[-1])
            tables = (torch.cos(f).contiguous(), torch.sin(f).contiguous())
        with self._lock:
            self._cache[key] = (weakref.ref(freqs), version, tables)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return tables


_tables = _Tables()


class _FusedRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)  # the tables only: the rotation is linear in t
        return _extension._C.rope(t, cos, sin, False)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward raises, not a wrong grad
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _extension._C.rope(dy, cos, sin, True), None, None


def apply_rope(t: torch.Tensor, freqs: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """megatron-core's non-interleaved RoPE of ``t [s, b, heads, d]`` by ``freqs [s, 1, 1, rot]``
    (contiguous output). ``impl``: ``auto`` (the fused kernel where compiled for ``t``'s device
    and dtype and :func:`fused_rope_applies`, else the reference), ``fused`` (the compiled kernel;
    an error where there is none or the call is not one it computes), ``torch`` (the
    reference)."""
    if impl not in ("auto", "fused", "torch"):
        raise ValueError(f"apply_rope: impl must be auto, fused or torch, got {impl!r}")
    if impl == "fused":
        if not has_rope_kernels(t.device):
            raise RuntimeError(f"apply_rope: megatron_slm._C has no RoPE kernel for {t.device}")
        if not fused_rope_applies(t, freqs):
            raise ValueError(
                f"apply_rope: the fused kernel takes t [s, b, heads, d] and freqs [s, 1, 1, d], "
                f"got {tuple(t.shape)} and {tuple(freqs.shape)}"
            )
        return _FusedRoPE.apply(t, *_tables(freqs))
    if (
        impl == "auto"
        and t.dtype in _FUSED_DTYPES
        and has_rope_kernels(t.device)
        and fused_rope_applies(t, freqs)
    ):
        return _FusedRoPE.apply(t, *_tables(freqs))
    return rope_reference(t, freqs)
