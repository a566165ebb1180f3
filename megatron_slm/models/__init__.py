"""Llama-style GPT models on megatron-core: presets, layer specs, the model provider."""

from megatron_slm.models.presets import (
    PRESETS,
    GPTModelConfig,
    check_parallel_layout,
    get_preset,
    padded_vocab_size,
)
from megatron_slm.models.provider import (
    ModelBuildOptions,
    build_gpt_chunk,
    build_model,
    build_transformer_config,
)
from megatron_slm.models.specs import SPEC_IMPLS, default_spec_impl, gpt_block_spec

__all__ = [
    "PRESETS",
    "SPEC_IMPLS",
    "GPTModelConfig",
    "ModelBuildOptions",
    "build_gpt_chunk",
    "build_model",
    "build_transformer_config",
    "check_parallel_layout",
    "default_spec_impl",
    "get_preset",
    "gpt_block_spec",
    "padded_vocab_size",
]
