"""Loading a model for evaluation and the forward pass the evaluators share.

``load_model`` accepts a megatron_slm checkpoint (root or ``iter_N`` directory) or a Hugging Face
Llama/Mistral directory (converted in memory). Evaluation runs with tensor parallelism (every TP
rank runs the same loop in lockstep; logits are gathered over TP); pipeline parallelism is not
supported. With a world larger than TP, every data-parallel replica does the same work.

Logits are restricted to the real vocabulary: the padding rows megatron adds for TP never win a
greedy step and do not enter the softmax of the loss (so losses equal those of the HF model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_slm.models.presets import GPTModelConfig


@dataclass
class EvalModel:
    model: torch.nn.Module  # one megatron-core GPTModel chunk (PP=1)
    config: GPTModelConfig
    tokenizer: object | None  # megatron_slm.data tokenizer, None when none is known
    padded_vocab_size: int
    source: str

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size


def _is_hf_dir(path: str) -> bool:
    from megatron_slm.training.checkpointing import METADATA, TRACKER

    return (
        os.path.isfile(os.path.join(path, "config.json"))
        and not os.path.isfile(os.path.join(path, METADATA))
        and not os.path.isfile(os.path.join(path, TRACKER))
    )


def load_model(
    load: str,
    *,
    tensor_model_parallel_size: int = 1,
    device: str = "auto",
    tokenizer_type: str | None = None,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
    transformer_impl: str | None = None,
    params_dtype: torch.dtype = torch.float32,
    seed: int = 1234,
) -> EvalModel:
    """Initialise the process group / parallel state (TP only) and load ``load``."""
    from megatron_slm.convert import hf as hfconv
    from megatron_slm.data.tokenizer import build_tokenizer
    from megatron_slm.launch import initialize
    from megatron_slm.models import ModelBuildOptions, build_model, default_spec_impl
    from megatron_slm.models.presets import padded_vocab_size
    from megatron_slm.training.checkpointing import (
        load_checkpoint,
        model_config_from_checkpoint,
        read_metadata,
    )

    tp = tensor_model_parallel_size
    dev = initialize(device=device, tensor_model_parallel_size=tp, seed=seed)
    impl = transformer_impl or default_spec_impl(dev)
    if not os.path.isdir(load):
        raise ValueError(f"--load {load}: no such directory")
    if _is_hf_dir(load):
        hf_cfg = hfconv.read_hf_config(load)
        config = hfconv.gpt_config_from_hf(hf_cfg, os.path.join(load, "config.json"))
        tied = bool(hf_cfg.get("tie_word_embeddings", False))
        weights = hfconv.HFWeights(load)
        hfconv.check_hf_weights(config, weights, tied)
        opts = ModelBuildOptions(transformer_impl=impl, params_dtype=params_dtype)
        (model,) = build_model(config, opts)
        hfconv.load_hf_into_chunks([model], weights, config, tied)
        tok_args = ("HuggingFaceTokenizer", load, None) if hfconv.tokenizer_files(load) else None
    else:
        config = model_config_from_checkpoint(load)
        meta = read_metadata(load)
        opts = hfconv.build_options_for_checkpoint(
            load, tp, transformer_impl=impl, params_dtype=params_dtype
        )
        (model,) = build_model(config, opts)
        load_checkpoint(load, [model], weights_only=True)
        tok = meta.get("tokenizer") or {}
        tok_args = (tok["type"], tok.get("model"), tok.get("vocab_size")) if tok else None
    if tokenizer_type is not None:
        tok_args = (tokenizer_type, tokenizer_model, vocab_size)
    tokenizer = build_tokenizer(*tok_args) if tok_args else None
    model.to(dev).eval()
    padded = padded_vocab_size(config.vocab_size, opts.make_vocab_size_divisible_by, tp)
    return EvalModel(model, config, tokenizer, padded, os.path.abspath(load))


@torch.no_grad()
def forward_logits(m: EvalModel, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens [b, s]`` -> fp32 logits over the real vocabulary ``[b, s, vocab]`` (TP-gathered)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    device = next(m.model.parameters()).device
    tokens = tokens.to(device)
    position_ids = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    logits = m.model(tokens, position_ids, None)  # [b, s, v / tp]
    logits = gather_from_tensor_model_parallel_region(logits)  # [b, s, v_padded]
    return logits[..., : m.vocab_size].float()


@torch.no_grad()
def token_losses(m: EvalModel, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens [b, s + 1]`` -> per-token loss ``[b, s]`` of tokens 1..s given the ones before."""
    logits = forward_logits(m, tokens[:, :-1])  # [b, s, v]
    return torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), tokens[:, 1:].to(logits.device), reduction="none"
    ).cpu()
