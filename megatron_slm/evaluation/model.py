"""The model an evaluation runs: a megatron_slm checkpoint (through ``megatron_slm.runtime``) or a
Hugging Face Llama/Mistral directory (converted in memory by ``megatron_slm.convert``).

Evaluation runs with tensor parallelism (every TP rank runs the same loop in lockstep; logits are
gathered over TP); pipeline parallelism is not supported. With a world larger than TP, every
data-parallel replica does the same work. Losses and greedy steps use the real vocabulary only:
the padding rows megatron adds never win a greedy step, and losses equal those of the HF model.
"""

from __future__ import annotations

import os

import torch

from megatron_slm.checkpoint import METADATA, TRACKER
from megatron_slm.errors import CheckpointError
from megatron_slm.runtime import LoadedModel, load_model


def is_hf_dir(path: str) -> bool:
    return (
        os.path.isfile(os.path.join(path, "config.json"))
        and not os.path.isfile(os.path.join(path, METADATA))
        and not os.path.isfile(os.path.join(path, TRACKER))
    )


def load_eval_model(
    load: str,
    device: torch.device,
    *,
    model_args=None,
    tokenizer_args=None,
    params_dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load ``load`` for the initialised (TP-only) parallel layout."""
    if not os.path.isdir(load):
        raise CheckpointError(f"--load {load}: no such directory")
    if is_hf_dir(load):
        from megatron_slm.convert.hf import load_hf_model

        return load_hf_model(
            load,
            device,
            tokenizer_args=tokenizer_args,
            params_dtype=params_dtype,
            transformer_impl=getattr(model_args, "transformer_impl", None),
        )
    return load_model(
        load,
        device,
        model_args=model_args,
        tokenizer_args=tokenizer_args,
        params_dtype=params_dtype,
    )
