"""The model an evaluation runs: a megatron_slm checkpoint or a Hugging Face Llama/Mistral
directory (converted in memory), both through ``megatron_slm.runtime``'s one front door
(``plan_load`` -> ``load_model``).

Evaluation runs with tensor parallelism (every TP rank runs the same loop in lockstep; logits are
gathered over TP); pipeline parallelism is not supported. With a world larger than TP, every
data-parallel replica does the same work. Losses and greedy steps use the real vocabulary only:
the padding rows megatron adds never win a greedy step, and losses equal those of the HF model.
"""

from __future__ import annotations

import torch

from megatron_slm.runtime import LoadArgs, LoadedModel, is_hf_dir, load_model, plan_load

__all__ = ["is_hf_dir", "load_eval_model"]


def load_eval_model(
    load: str,
    device: torch.device,
    *,
    model_args=None,
    tokenizer_args=None,
    params_dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Plan and load ``load`` for the initialised (TP-only) parallel layout: the one call for
    callers that hold a path (lm-eval's ``model_args``); tools plan from their config."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    args = LoadArgs(load=load, device=device.type, tensor_model_parallel_size=tp)
    plan = plan_load(args, model_args=model_args, tokenizer_args=tokenizer_args)
    return load_model(plan, device, params_dtype=params_dtype)
