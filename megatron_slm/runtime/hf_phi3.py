"""Phi-3's tensors (``Phi3ForCausalLM``: Phi-3, Phi-3.5 and Phi-4-mini) as Llama's, both ways.

Phi-3 is Llama's design with two fused projections: ``self_attn.qkv_proj`` stacks the query rows
of every head, then the key rows, then the value rows (``[q; k; v]``, not megatron's per-group
interleave), and ``mlp.gate_up_proj`` stacks ``[gate; up]`` (transformers' ``chunk(2)``: the gate
first). Reading, :class:`Phi3Weights` shows a directory's tensors under Llama's names (each a
slice of its fused tensor), so the Llama mapping and its shape checks apply unchanged; writing,
:func:`fuse_phi3` stacks the Llama-named tensors of the export back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

PHI3_ARCHITECTURE = "Phi3ForCausalLM"
_FUSED = re.compile(r"(model\.layers\.\d+\.)(self_attn\.qkv_proj|mlp\.gate_up_proj)\.weight")
_LAYER_WEIGHT = re.compile(r"(model\.layers\.\d+\.)(.+)\.weight")
_PARTS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}  # fmt: skip


class Phi3Weights:
    """An ``HFWeights`` of a Phi-3 directory with its fused tensors split into Llama's names.
    ``q_rows``/``kv_rows``: the query and key (= value) rows the config implies; a fused tensor
    of another size gives a last part of another size, which the shape check reports."""

    def __init__(self, weights, q_rows: int, kv_rows: int):
        self._weights, self.path = weights, weights.path
        self._parts: dict[str, tuple[str, int, int]] = {}  # Llama name -> (fused, start, stop)
        for name in weights.names():
            m = _FUSED.fullmatch(name)
            if not m:
                continue
            rows = weights.shape(name)[0]
            if m.group(2) == "self_attn.qkv_proj":
                bounds = (0, q_rows, q_rows + kv_rows, rows)
            else:
                bounds = (0, rows // 2, rows)
            for part, start, stop in zip(_PARTS[m.group(2)], bounds, bounds[1:]):
                self._parts[f"{m.group(1)}{part}.weight"] = (name, start, stop)

    def names(self) -> list[str]:
        fused = {fused for fused, _, _ in self._parts.values()}
        return [n for n in self._weights.names() if n not in fused] + list(self._parts)

    def __contains__(self, name: str) -> bool:
        return name in self._parts or (name in self._weights and not _FUSED.fullmatch(name))

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._parts:
            return self._weights.shape(name)
        fused, start, stop = self._parts[name]
        return (max(stop - start, 0), *self._weights.shape(fused)[1:])

    def get(self, name: str) -> torch.Tensor:
        if name not in self._parts:
            return self._weights.get(name)
        fused, start, stop = self._parts[name]
        return self._weights.get(fused)[start:stop]

    def location(self, name: str) -> str:
        return self._weights.location(self._parts[name][0] if name in self._parts else name)


def fuse_phi3(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Llama-named export tensors -> Phi-3's: each layer's q/k/v and gate/up stacked into
    ``qkv_proj`` and ``gate_up_proj`` (the parts of one arrive together)."""
    fused_of = {part: fused for fused, parts in _PARTS.items() for part in parts}
    pending: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        m = _LAYER_WEIGHT.fullmatch(name)
        if not m or m.group(2) not in fused_of:
            yield name, tensor
            continue
        pending[m.group(2)] = tensor
        fused = fused_of[m.group(2)]
        if all(p in pending for p in _PARTS[fused]):
            yield f"{m.group(1)}{fused}.weight", torch.cat([pending.pop(p) for p in _PARTS[fused]])
