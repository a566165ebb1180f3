"""The model flags every entry point shares (trainer, scorer, evaluator, converter, new tools).

A user's ``MODEL_ARGS`` mean the same thing everywhere: a preset plus explicit overrides. Without a
checkpoint they define the architecture (the vocabulary comes from the tokenizer); with one
(``--load``) the checkpoint's recorded architecture is used and these flags may only confirm it
(``megatron_slm.checkpoint.resolve_architecture``, Megatron-LM's ``--use-checkpoint-args``).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_slm.cli import arg
from megatron_slm.errors import ConfigError
from megatron_slm.models.presets import GPTModelConfig, get_preset

DEFAULT_PRESET = "tiny"
DEFAULT_VOCAB_DIVISOR = 128
ARCHITECTURE_FLAGS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "max_position_embeddings",
    "rotary_base",
    "norm_epsilon",
)


@dataclass
class ModelArgs:
    model_preset: str | None = arg(
        None,
        f"Architecture preset (tiny, tinyllama-1.1b, mistral-7b, pangu-pi-1b-pro, "
        f"pangu-pi-1.5b-pro). Default: the --load checkpoint's architecture, else "
        f"{DEFAULT_PRESET}.",
    )
    num_layers: int | None = arg(None, "Override the preset's number of layers.")
    hidden_size: int | None = arg(None, "Override the preset's hidden size.")
    ffn_hidden_size: int | None = arg(None, "Override the preset's SwiGLU width.")
    num_attention_heads: int | None = arg(None, "Override the preset's query heads.")
    num_query_groups: int | None = arg(None, "Override the preset's key/value heads (GQA).")
    max_position_embeddings: int | None = arg(None, "Override the preset's maximum length.")
    rotary_base: float | None = arg(None, "Override the preset's RoPE base.")
    norm_epsilon: float | None = arg(None, "Override the preset's RMSNorm epsilon.")
    make_vocab_size_divisible_by: int | None = arg(
        None,
        f"Pad the vocabulary to a multiple of this x TP (default {DEFAULT_VOCAB_DIVISOR}; a loaded "
        "checkpoint keeps its padded vocabulary at any TP that divides it).",
    )
    transformer_impl: str | None = arg(
        None, "Layer implementation: te, local or torch (default: te/local on GPU, torch on CPU)."
    )

    def __post_init__(self):
        if self.model_preset is not None:
            get_preset(self.model_preset)  # unknown preset -> error naming --model-preset
        if self.transformer_impl not in (None, "te", "local", "torch"):
            raise ConfigError(
                f"--transformer-impl must be te, local or torch, got {self.transformer_impl!r}"
            )
        if self.make_vocab_size_divisible_by is not None and self.make_vocab_size_divisible_by < 1:
            raise ConfigError("--make-vocab-size-divisible-by must be >= 1")

    def overrides(self) -> dict:
        """The architecture flags given explicitly (not None)."""
        return {k: getattr(self, k) for k in ARCHITECTURE_FLAGS if getattr(self, k) is not None}

    def architecture(self, vocab_size: int) -> GPTModelConfig:
        """The architecture these flags describe on their own (no checkpoint)."""
        preset = get_preset(self.model_preset or DEFAULT_PRESET)
        return preset.replace(vocab_size=vocab_size, **self.overrides())

    def record(self) -> dict:
        """What a checkpoint records about how its architecture was chosen."""
        return {"model_preset": self.model_preset, "overrides": self.overrides()}

    @property
    def vocab_divisor(self) -> int:
        return self.make_vocab_size_divisible_by or DEFAULT_VOCAB_DIVISOR
