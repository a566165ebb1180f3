"""Load a checkpoint for inference at the current TP/PP layout.

One rule for every loader: the architecture and the tokenizer come from the checkpoint's metadata
(flags may only confirm them, see ``megatron_slm.checkpoint.resolve_architecture``), and the padded
vocabulary is the checkpoint's, kept at any TP size that divides it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_slm.checkpoint import (
    CheckpointInfo,
    load_checkpoint,
    read_checkpoint,
    resolve_architecture,
    resolve_tokenizer,
)
from megatron_slm.data.tokenizer import TokenizerArgs
from megatron_slm.errors import CheckpointError
from megatron_slm.models.args import ModelArgs
from megatron_slm.models.presets import GPTModelConfig


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
    checkpoint: CheckpointInfo | None = None  # None for a model converted in memory

    @property
    def vocab_size(self) -> int:
        return self.arch.vocab_size

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
    load: str,
    device: torch.device,
    *,
    model_args: ModelArgs | None = None,
    tokenizer_args: TokenizerArgs | None = None,
    params_dtype: torch.dtype = torch.float32,
    flag: str = "--load",
    with_tokenizer: bool = True,
    require_tokenizer: bool = False,
) -> LoadedModel:
    """Build and load the checkpoint ``load`` (root or ``iter_N``) for the initialised layout.

    Raises ``ValueError`` naming the flag for a missing checkpoint, flags that contradict it, or
    weights that do not fit."""
    from megatron.core import parallel_state

    from megatron_slm.models import ModelBuildOptions, build_model, default_spec_impl

    model_args = model_args or ModelArgs()
    info = read_checkpoint(load, flag)
    tokenizer = None
    if with_tokenizer:
        tok_args = tokenizer_args or TokenizerArgs()
        tokenizer, _, _ = resolve_tokenizer(tok_args, info, require_tokenizer)
    arch = resolve_architecture(model_args, info, None)
    if tokenizer is not None and tokenizer.vocab_size > info.padded_vocab_size:
        raise CheckpointError(
            f"{flag} {load}: the tokenizer has {tokenizer.vocab_size} ids, more than the model's "
            f"{info.padded_vocab_size} embedding rows"
        )
    tp = parallel_state.get_tensor_model_parallel_world_size()
    opts = ModelBuildOptions(
        transformer_impl=model_args.transformer_impl or default_spec_impl(device),
        params_dtype=params_dtype,
        make_vocab_size_divisible_by=info.divisor_for(tp),
        use_cpu_initialization=device.type == "cpu",
    )
    chunks = build_model(arch, opts, device)
    try:
        load_checkpoint(info.path, chunks, weights_only=True, flag=flag)
    except Exception as e:  # noqa: BLE001 - shape mismatches surface as many exception types
        raise CheckpointError(
            f"{flag} {load}: cannot load the weights ({type(e).__name__}: {e})"
        ) from e
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    padded = chunks[0].vocab_size
    return LoadedModel(chunks, arch, tokenizer, padded, device, params_dtype, info.path, info)
