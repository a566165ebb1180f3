"""YaRN in megatron-core's GPT model (Qwen2.5's and Qwen3's long-context setting; Megatron-LM's
``--position-embedding-type yarn``).

megatron-core 0.16 has a ``YarnRotaryEmbedding`` but its GPT model reads the settings from config
attributes that its ``TransformerConfig`` lacks, and the module only runs on CUDA. YaRN's
frequencies do not depend on the sequence length, so megatron-core's plain rotary module with
YaRN's inverse frequencies (:func:`yarn_inv_freq`, transformers' expression, which is also
megatron-core's) is the whole rotation; the attention factor goes through the YaRN concentration
factor megatron-core's attention applies to the cosine and sine
(:func:`megatron_slm.models.longrope.set_attention_factor`).
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_slm.models.longrope import replace_rotary
from megatron_slm.models.presets import GPTModelConfig, Yarn


def yarn_inv_freq(base: float, rotated: int, yarn: Yarn) -> torch.Tensor:
    """YaRN's inverse frequencies (fp32) for ``rotated`` rotated channels of a head."""

    def correction_dim(turns: float) -> float:  # the frequency index of ``turns`` rotations
        length = yarn.original_max_positions
        return rotated * math.log(length / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotated - 1)
    if low == high:
        high += 0.001  # (a step, not a division by zero)
    ramp = ((torch.arange(rotated // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    original = 1.0 / base ** (torch.arange(0, rotated, 2).float() / rotated)
    return original / yarn.factor * ramp + original * (1 - ramp)


class YarnEmbedding(RotaryEmbedding):
    """megatron-core's rotary module with YaRN's inverse frequencies."""

    def __init__(self, yarn: Yarn, rotary_base: float, **kwargs):
        super().__init__(rotary_base=rotary_base, **kwargs)
        rotated = int(kwargs["kv_channels"] * kwargs.get("rotary_percent", 1.0))  # (as there)
        self.inv_freq = yarn_inv_freq(rotary_base, rotated, yarn).to(self.inv_freq.device)


def install_yarn(chunk, model: GPTModelConfig) -> None:
    """Replace a GPTModel chunk's rotary module by :class:`YarnEmbedding` (same arguments)."""
    replace_rotary(chunk, model, YarnEmbedding, model.yarn)
