"""Hugging Face <-> megatron-core checkpoints (Llama and Mistral)."""

from megatron_slm.convert.hf import (
    SUPPORTED_ARCHITECTURES,
    ConversionError,
    HFWeights,
    build_options_for_checkpoint,
    check_hf_weights,
    checkpoint_padded_vocab_size,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    gpt_config_from_hf,
    hf_config_from_gpt,
    hf_tensors_from_megatron,
    load_hf_into_chunks,
    megatron_tensor_from_hf,
    read_hf_config,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ConversionError",
    "HFWeights",
    "build_options_for_checkpoint",
    "check_hf_weights",
    "checkpoint_padded_vocab_size",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "gpt_config_from_hf",
    "hf_config_from_gpt",
    "hf_tensors_from_megatron",
    "load_hf_into_chunks",
    "megatron_tensor_from_hf",
    "read_hf_config",
]
