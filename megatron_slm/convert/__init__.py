"""Hugging Face <-> megatron-core checkpoints (Llama, Mistral, Qwen2 and Qwen3 both ways; GPT-3's
architecture exports as GPT-2)."""

from megatron_slm.convert.hf import convert_hf_to_megatron, convert_megatron_to_hf, import_layout
from megatron_slm.convert.hf_target import hf_config_from_gpt, hf_tensors_from_megatron
from megatron_slm.runtime.hf_source import (
    SUPPORTED_ARCHITECTURES,
    ConversionError,
    HFWeights,
    check_hf_weights,
    gpt_config_from_hf,
    load_hf_into_chunks,
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
    "load_hf_into_chunks",
    "megatron_tensor_from_hf",
    "read_hf_config",
]
