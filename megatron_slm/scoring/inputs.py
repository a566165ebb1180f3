"""Everything scoring needs that can be checked before any process group exists: the data
prefixes, the reference model (its architecture, tokenizer and padding: the runtime's load plan,
read once), the window geometry, and the settings a sidecar records."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from megatron_slm.checkpoint import CheckpointInfo
from megatron_slm.models.presets import GPTModelConfig
from megatron_slm.runtime.plan import LoadPlan, plan_load
from megatron_slm.scoring.config import ScoreConfig, ScoringError


def default_stride(seq_length: int) -> int:
    """Default --stride: three quarters of the sequence length.

    Scored tokens of long documents keep at least seq_length / 4 tokens of context (512 at 2048),
    and each of their tokens is forwarded about 1.33 times instead of 2 (stride seq/2). Measured on
    the CPU benchmark: scoring/training tokens/s 2.81-2.91x at 3/4 vs 2.45x at 1/2
    (benchmarks/RESULTS_score_corpus.md). Pass --stride for more context."""
    return max(1, seq_length * 3 // 4)


def model_dtype(config: ScoreConfig, ckpt: CheckpointInfo) -> torch.dtype:
    """The dtype the reference model runs in: the checkpoint's recorded ``params_dtype``
    (bfloat16 for a model trained in bfloat16), float32 when none is recorded or with ``--fp32``."""
    if config.fp32:
        return torch.float32
    return ckpt.params_dtype or torch.float32


@dataclass
class ScoringInputs:
    checkpoint: CheckpointInfo
    arch: GPTModelConfig
    tokenizer: object | None
    vocab_limit: int
    """Ids at or above this are an error in the data (the tokenizer's size, else the model's)."""
    seq_length: int
    stride: int
    reference: str
    """The reference identity recorded in the sidecar (checkpoint, metadata digest, tokenizer)."""
    params_dtype: torch.dtype = torch.float32
    """The dtype the model runs in: the checkpoint's (``--fp32``: float32)."""
    plan: LoadPlan | None = None
    """The reference model, planned once (``load_model`` reads no metadata again)."""

    def settings(self, config: ScoreConfig) -> dict:
        """The settings recorded in the sidecar metadata: everything that changes the bytes."""
        return {
            "tool": "tools/score_corpus.py",
            "seq_length": self.seq_length,
            "stride": self.stride,
            "micro_batch_size": config.micro_batch_size,
            "commit_interval": config.commit_interval,
            "packing": config.packing_mode,
            "tensor_model_parallel_size": config.tensor_model_parallel_size,
            "pipeline_model_parallel_size": config.pipeline_model_parallel_size,
            "params_dtype": str(self.params_dtype).removeprefix("torch."),
            "make_vocab_size_divisible_by": self.checkpoint.divisor_for(
                config.tensor_model_parallel_size
            ),
        }


def _check_data_prefix(prefix: str) -> None:
    from megatron_slm.data.index_file import read_index

    try:
        read_index(prefix, flag="--data-prefix")  # missing or damaged .bin/.idx, named
    except ValueError as e:
        raise ScoringError(str(e)) from None


def _reference_identity(ckpt: CheckpointInfo, tokenizer) -> str:
    digest = hashlib.sha256(json.dumps(ckpt.meta, sort_keys=True).encode()).hexdigest()[:16]
    ident = (
        f"{os.path.abspath(ckpt.path)}:iteration={ckpt.meta.get('iteration')}:meta-sha256={digest}"
    )
    if tokenizer is not None:
        ident += f":tokenizer={tokenizer.identity()}"
    return ident


def resolve_inputs(config: ScoreConfig) -> ScoringInputs:
    """Check every input (same result on all ranks); errors are ScoringErrors naming the flag."""
    for prefix in config.data_prefix:
        _check_data_prefix(prefix)
    try:
        plan = plan_load(config)
    except ValueError as e:
        raise ScoringError(str(e)) from None
    ckpt, tokenizer, arch = plan.checkpoint, plan.tokenizer, plan.arch
    vocab_limit = arch.vocab_size
    if tokenizer is not None:
        if tokenizer.vocab_size > arch.vocab_size:
            raise ScoringError(
                f"the tokenizer ({tokenizer.vocab_size} ids, {tokenizer.identity()}) is larger "
                f"than the reference model's vocabulary of {arch.vocab_size} ({ckpt.path})"
            )
        vocab_limit = tokenizer.vocab_size
    seq = config.seq_length or ckpt.seq_length or arch.max_position_embeddings
    if arch.position_embedding_type == "learned_absolute" and seq > arch.max_position_embeddings:
        raise ScoringError(
            f"--seq-length {seq} exceeds the {arch.max_position_embeddings} learned positions of "
            f"the reference model ({ckpt.path})"
        )
    stride = config.stride or default_stride(seq)
    if stride > seq:
        raise ScoringError(f"--stride {stride} must be <= --seq-length {seq}")
    return ScoringInputs(
        checkpoint=ckpt,
        arch=arch,
        tokenizer=tokenizer,
        vocab_limit=vocab_limit,
        seq_length=seq,
        stride=stride,
        reference=_reference_identity(ckpt, tokenizer),
        params_dtype=model_dtype(config, ckpt),
        plan=plan,
    )
