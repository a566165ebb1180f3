"""Load a planned model for inference at the current TP/PP layout.

One rule for every loader: the architecture and the tokenizer are the plan's (``runtime.plan``:
the checkpoint's metadata, read once; flags may only confirm them), and the padded vocabulary is
the checkpoint's, kept at any TP size that divides it. A Hugging Face directory is converted in
memory into the same chunks (``runtime.hf_source``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import torch

from megatron_slm.checkpoint import CheckpointInfo, load_checkpoint
from megatron_slm.errors import CheckpointError, UserError
from megatron_slm.models.document_mask import reads_document_masks
from megatron_slm.models.presets import GPTModelConfig
from megatron_slm.runtime.plan import LoadPlan

logger = logging.getLogger("megatron_slm")


@dataclass
class LoadedModel:
    """This rank's chunks of a loaded model, in eval mode, with what it was loaded from."""

    chunks: list  # megatron-core GPTModel chunks of this rank (one per virtual stage)
    arch: GPTModelConfig
    tokenizer: object | None  # megatron_slm.data tokenizer; None when none is known
    padded_vocab_size: int
    device: torch.device
    dtype: torch.dtype
    source: str  # what was loaded (checkpoint iteration directory, or a Hugging Face directory)
    checkpoint: CheckpointInfo | None = None  # the plan's facts (a HF directory's: implied)

    @property
    def vocab_size(self) -> int:
        return self.arch.vocab_size

    @cached_property
    def reads_document_masks(self) -> bool:
        """Whether its attention takes a ``DocumentMask`` as it is (else: its dense mask)."""
        return reads_document_masks(self.chunks)

    @property
    def is_last_stage(self) -> bool:
        from megatron.core import parallel_state

        return parallel_state.is_pipeline_last_stage()


def job_device(config, error: type[Exception]) -> torch.device:
    """The device of a job whose entry point set up the process groups: checks that the parallel
    state has the config's ``--tensor/pipeline-model-parallel-size`` (raising ``error``) and
    resolves ``config.device`` (CUDA: this rank's current device)."""
    from megatron.core import parallel_state

    from megatron_slm.platform import resolve_device

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (config.tensor_model_parallel_size, config.pipeline_model_parallel_size):
        raise error(
            f"the parallel state is TP={tp}, PP={pp}; the config asks for "
            f"--tensor-model-parallel-size {config.tensor_model_parallel_size} "
            f"--pipeline-model-parallel-size {config.pipeline_model_parallel_size}"
        )
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def load_model(
    plan: LoadPlan,
    device: torch.device,
    *,
    params_dtype: torch.dtype = torch.float32,
    documents: str | None = None,
) -> LoadedModel:
    """Build ``plan``'s model for the initialised layout and read its weights (the metadata is
    not read again). Raises ``CheckpointError`` naming the plan's flag for weights that do not
    fit. ``documents``: the flag for which the caller will pass rows packing several documents
    (a ``DocumentMask`` or block-diagonal mask): the model gets the torch spec, the one that
    honours it (``models.args.packed_documents_spec``; callers refuse another
    ``--transformer-impl`` with their config, before any work). From plain Python (a notebook,
    a script) with no process group yet, it creates a one-process group (TP=1, PP=1) first and
    logs that it did."""
    from megatron.core import parallel_state

    from megatron_slm.models import ModelBuildOptions, build_model, default_spec_impl
    from megatron_slm.models.args import packed_documents_spec

    if not parallel_state.model_parallel_is_initialized():
        from megatron_slm import launch

        launch.initialize(device=device.type)
        logger.warning("load_model: no process group, created a one-process group (TP=1, PP=1)")

    tp = parallel_state.get_tensor_model_parallel_world_size()
    opts = ModelBuildOptions(
        transformer_impl=(
            packed_documents_spec(plan.transformer_impl, documents)
            if documents
            else plan.transformer_impl or default_spec_impl(device)
        ),
        params_dtype=params_dtype,
        make_vocab_size_divisible_by=plan.divisor_for(tp),
        use_cpu_initialization=device.type == "cpu",
    )
    chunks = build_model(plan.arch, opts, device)
    try:
        if plan.is_hf:
            _load_hf_weights(plan, chunks)
        else:
            load_checkpoint(plan.checkpoint, chunks, weights_only=True, flag=plan.flag)
    except UserError:
        raise  # names the file or tensor already
    except Exception as e:  # noqa: BLE001 - shape mismatches surface as many exception types
        raise CheckpointError(
            f"{plan.flag} {plan.path}: cannot load the weights ({type(e).__name__}: {e})"
        ) from e
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    padded = chunks[0].vocab_size
    return LoadedModel(
        chunks, plan.arch, plan.tokenizer, padded, device, params_dtype, plan.path, plan.checkpoint
    )


def _load_hf_weights(plan: LoadPlan, chunks) -> None:
    """A HF directory's tensors into this rank's chunks (convert's HF -> megatron mapping)."""
    from megatron_slm.runtime.hf_source import (
        check_hf_weights,
        hf_tied,
        load_hf_into_chunks,
        open_hf_weights,
    )

    tied = hf_tied(plan.hf_config)
    weights = open_hf_weights(plan.path, plan.hf_config, plan.arch)
    check_hf_weights(plan.arch, weights, tied)
    load_hf_into_chunks(chunks, weights, plan.arch, tied)
