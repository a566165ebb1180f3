"""Data layer: tokenizers, preprocessing into megatron-core indexed datasets, the reference-loss
sidecar and the SLM GPT dataset (samples carry ``ref_loss``).

Imports are lazy so ``import megatron_slm.data`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_tokenizer": "tokenizer",
    "train_sentencepiece": "tokenizer",
    "preprocess_corpus": "preprocess",
    "sidecar_prefix": "sidecar",
    "sidecar_exists": "sidecar",
    "SidecarWriter": "sidecar",
    "SidecarReader": "sidecar",
    "SidecarError": "sidecar",
    "SLMGPTDataset": "gpt_dataset",
    "build_gpt_datasets": "gpt_dataset",
    "inspect_sidecar": "inspect",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
