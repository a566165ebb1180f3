"""LongRoPE in megatron-core's GPT model (Phi-3.5-mini, Phi-4-mini, Phi-3-*-128k).

Two parts, both as transformers computes them:

* **Frequencies.** Rotated frequency ``i`` is ``1 / (factor[i] * base ** (2i / d))`` with the
  short factors for a forward over at most ``original_max_positions`` positions, the long ones
  beyond. megatron-core asks its rotary module for a table of the forward's length (the sequence,
  or an inference context's whole ``max_sequence_length``), so :class:`LongRopeEmbedding` picks
  the factors by that length: training and scoring rows, and decoding without a cache, get
  transformers' choice; cached decoding that outgrows the original length encodes the sequence
  again (``runtime.generate``), as transformers' Phi-3 does.
* **Attention factor.** The cosine and sine are multiplied by it. megatron-core's attention
  multiplies them by YaRN's concentration factor, read from the config
  (``_yarn_get_concentration_factor_from_config``), and nothing else reads those fields of a
  ``rope`` model, so :func:`set_attention_factor` states the factor in them: scale ``e`` makes
  YaRN's ``0.1 * mscale * ln(scale) + 1`` equal ``attention_factor`` for ``mscale =
  10 * (attention_factor - 1)``, over an ``mscale_all_dim`` of 0 (a divisor of 1).
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer import TransformerConfig

from megatron_slm.errors import ConfigError
from megatron_slm.models.presets import GPTModelConfig, LongRope


def longrope_inv_freq(base: float, factors: tuple[float, ...]) -> torch.Tensor:
    """transformers' LongRoPE inverse frequencies (fp32, its expression) for ``len(factors)``
    rotated pairs."""
    dim = 2 * len(factors)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base**exponents)


class LongRopeEmbedding(RotaryEmbedding):
    """megatron-core's rotary module with LongRoPE's frequencies, chosen per table length."""

    def __init__(self, longrope: LongRope, rotary_base: float, **kwargs):
        super().__init__(rotary_base=rotary_base, **kwargs)
        device = self.inv_freq.device
        self.longrope = longrope
        self.short_inv_freq = longrope_inv_freq(rotary_base, longrope.short_factor).to(device)
        self.long_inv_freq = longrope_inv_freq(rotary_base, longrope.long_factor).to(device)

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        long = max_seq_len + offset > self.longrope.original_max_positions
        chosen = self.long_inv_freq if long else self.short_inv_freq
        # (megatron-core moves inv_freq to the GPU at its first table; follow it)
        self.inv_freq = chosen.to(self.inv_freq.device)
        return super().get_freqs_non_repeated(max_seq_len, offset)


def install_longrope(chunk, model: GPTModelConfig) -> None:
    """Replace a GPTModel chunk's rotary module by :class:`LongRopeEmbedding` (same arguments)."""
    replace_rotary(chunk, model, LongRopeEmbedding, model.longrope)


def replace_rotary(chunk, model: GPTModelConfig, module: type, scaling) -> None:
    """Replace a GPTModel chunk's rotary module by ``module(scaling, base, ...)``, a subclass of
    megatron-core's built with the arguments megatron-core's GPTModel gave its own."""
    c = chunk.config
    chunk.rotary_pos_emb = module(
        scaling,
        model.rotary_base,
        kv_channels=c.kv_channels,
        rotary_percent=model.rotary_percent,
        rotary_interleaved=c.rotary_interleaved,
        use_cpu_initialization=c.use_cpu_initialization,
        cp_group=chunk.rotary_pos_emb.cp_group,
    )


def set_attention_factor(config: TransformerConfig, factor: float) -> None:
    """Make megatron-core's attention multiply RoPE's cosine and sine by ``factor`` (see the
    module's docstring); refused where this megatron-core reads the factor otherwise."""
    config.yarn_rotary_scaling_factor = math.e
    config.yarn_mscale = 10.0 * (factor - 1.0)
    config.yarn_mscale_all_dim = 0.0
    try:
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor_from_config,
        )
    except ImportError:
        applied = None
    else:
        applied = _yarn_get_concentration_factor_from_config(config)
    if applied is None or not math.isclose(applied, factor, rel_tol=1e-12):
        raise ConfigError(
            f"RoPE's attention factor {factor:g} (LongRoPE's, YaRN's): this megatron-core does "
            "not scale RoPE through its YaRN concentration factor"
        )
