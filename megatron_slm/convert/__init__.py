"""Hugging Face <-> megatron-core checkpoints (Llama and Mistral)."""

from megatron_slm.convert.hf import (
    SUPPORTED_ARCHITECTURES,
    ConversionError,
    HFWeights,
    check_hf_weights,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    gpt_config_from_hf,
    hf_config_from_gpt,
    hf_tensors_from_megatron,
    import_layout,
    load_hf_into_chunks,
    load_hf_model,
    megatron_tensor_from_hf,
    read_hf_config,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ConversionError",
    "HFWeights",
    "check_hf_weights",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "gpt_config_from_hf",
    "hf_config_from_gpt",
    "hf_tensors_from_megatron",
    "import_layout",
    "load_hf_model",
    "load_hf_into_chunks",
    "megatron_tensor_from_hf",
    "read_hf_config",
]
