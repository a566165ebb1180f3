"""Settings of ``tools/score_batches.py`` and ``tools/resample_batches.py`` (multiple-round
training); the CLIs are generated from these dataclasses.

The sampling flags (``--data-path``, ``--split``, ``--seq-length``, ``--seed``,
``--global-batch-size``, ``--train-iters``) mean what they mean for the trainer: together they
fix the sample order being scored, and a round-2 run is checked against them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_slm.cli import arg, check_at_least
from megatron_slm.data.tokenizer import TokenizerArgs
from megatron_slm.errors import ConfigError
from megatron_slm.models.args import ModelArgs, packed_documents_spec
from megatron_slm.runtime.plan import LoadArgs


@dataclass
class ScoreBatchesConfig(LoadArgs, ModelArgs, TokenizerArgs):
    """``--load`` (the frozen model), ``--device``, ``--tensor-model-parallel-size``:
    ``LoadArgs``."""

    data_path: list[str] = arg(
        [], "The trainer's blend: PREFIX or WEIGHT PREFIX WEIGHT PREFIX ...", nargs="+"
    )
    split: str = arg("969,30,1", "The trainer's --split.")
    seq_length: int | None = arg(None, "The trainer's --seq-length.", required=True)
    seed: int = arg(1234, "The trainer's --seed (data order).")
    global_batch_size: int | None = arg(None, "The trainer's --global-batch-size.", required=True)
    train_iters: int | None = arg(
        None,
        "Batches of the order to score, as the trainer's --train-iters (default: one epoch of "
        "the train split; a weighted blend needs it).",
    )
    data_cache_path: str | None = arg(None, "Where megatron-core caches sample indices.")
    reset_attention_mask: bool = arg(
        False,
        "The trainer's --reset-attention-mask: each document of a sample attends only to itself "
        "(a document ends with its end-of-document token), as the trainer computes its loss.",
    )
    eod_mask_loss: bool = arg(
        False,
        "The trainer's --eod-mask-loss: a sample's loss leaves out the token after each "
        "end-of-document token.",
    )
    output: str | None = arg(
        None, "Output prefix P: writes P.bin (per-sample losses) and P.json.", required=True
    )
    micro_batch_size: int = arg(4, "Samples per forward (divides --global-batch-size).")
    commit_interval: int = arg(
        8, "Batches per work chunk = the unit of data-parallel work and of resume."
    )
    bf16: bool = arg(False, "Run the model in bfloat16.")
    pipeline_model_parallel_size: int = arg(1, "Pipeline-parallel size.")
    overwrite: bool = arg(False, "Replace a published output; discard a mismatched partial one.")

    def __post_init__(self):
        LoadArgs.__post_init__(self)
        ModelArgs.__post_init__(self)
        TokenizerArgs.__post_init__(self)
        if not self.data_path:
            raise ConfigError("--data-path: give the trainer's blend")
        check_at_least(
            self,
            "seq_length",
            "global_batch_size",
            "micro_batch_size",
            "commit_interval",
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
        )
        if self.train_iters is not None and self.train_iters < 1:
            raise ConfigError("--train-iters must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"--micro-batch-size {self.micro_batch_size} must divide --global-batch-size "
                f"{self.global_batch_size}"
            )
        if self.reset_attention_mask:
            packed_documents_spec(self.spec_impl, "--reset-attention-mask")

    @property
    def num_samples(self) -> int | None:
        return None if self.train_iters is None else self.train_iters * self.global_batch_size


@dataclass
class ResampleConfig:
    losses: str | None = arg(
        None, "Batch losses from tools/score_batches.py (P or P.json).", required=True
    )
    keep: float = arg(0.5, "Share of the batches to draw (N0 = round(keep x N), at least 1).")
    temperature: float = arg(1.0, "T of p = softmax(loss / T); larger is closer to uniform.")
    seed: int = arg(1234, "Seed of the torch.Generator of the draw.")
    output: str | None = arg(None, "The batch list to write (e.g. round2.idx).", required=True)

    def __post_init__(self):
        if not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"--keep must be in (0, 1], got {self.keep}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"--temperature must be a positive number, got {self.temperature}")
