"""Settings of ``tools/score_corpus.py``: one typed config, the CLI generated from it.

The model and tokenizer flags are the trainer's own (``ModelArgs``, ``TokenizerArgs``): a user's
``MODEL_ARGS`` shared between the training and scoring scripts mean the same thing here. With
``--load`` they may only confirm the checkpoint's recorded architecture and tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_slm.cli import arg, check_at_least
from megatron_slm.data.indexed import blend_prefixes
from megatron_slm.data.tokenizer import TokenizerArgs
from megatron_slm.errors import UserError
from megatron_slm.models.args import ModelArgs, packed_documents_spec
from megatron_slm.runtime.plan import LoadArgs

PACKINGS = ("auto", "rows", "length-sorted")
VALUE_DTYPES = ("float16", "bfloat16", "float32")


class ScoringError(UserError):
    """Bad input or state for scoring, with a message naming the flag or file at fault."""


@dataclass
class ScoreConfig(LoadArgs, ModelArgs, TokenizerArgs):
    """``--load`` (the reference model), ``--device``, ``--tensor-model-parallel-size``:
    ``LoadArgs``."""

    data_prefix: list[str] = arg(
        [],
        "Token dataset prefixes (<P>.bin/.idx); a sidecar is written next to each. Numbers among "
        "them (Megatron --data-path weights) are ignored. --data-path is the same flag: the "
        "trainer's blend can be passed as it is.",
        required=True,
        aliases=("--data-path",),
    )
    fp32: bool = arg(
        False,
        "Run the model in float32 even when the checkpoint was trained in bfloat16/float16 "
        "(default: the checkpoint's recorded params_dtype, float32 when none is recorded).",
    )
    pipeline_model_parallel_size: int = arg(1, "Pipeline-parallel size.")
    seq_length: int | None = arg(
        None,
        "Row length = most context per scored token (default: the --seq-length the reference "
        "model was trained with, else its max_position_embeddings).",
    )
    stride: int | None = arg(
        None,
        "Sliding-window step for documents longer than --seq-length; scored tokens keep at least "
        "seq-length - stride tokens of context (default: 3/4 of --seq-length).",
    )
    micro_batch_size: int = arg(
        4,
        "Rows of --seq-length per forward (length-sorted batching: the same number of positions, "
        "in more, shorter rows). A forward keeps no activations for a backward, so at least "
        "twice the training micro-batch usually fits, and more rows per forward run faster.",
    )
    packing: str = arg(
        "auto",
        "rows: several documents per row, block-diagonal causal mask; length-sorted: one document "
        "per row, rows of similar length batched, plain causal attention (PP=1 only); auto: "
        "length-sorted with PP=1, else rows.",
        choices=PACKINGS,
    )
    dtype: str = arg("float16", "Sidecar value dtype.", choices=VALUE_DTYPES)
    commit_interval: int = arg(1000, "Documents per chunk = packing and commit unit.")
    max_docs: int | None = arg(
        None, "Score only the first N documents (trial; partial state kept, sidecar not published)."
    )
    dry_run: bool = arg(
        False,
        "Score two chunks per data-parallel rank, write nothing, print a time estimate (the "
        "second round's rate times the rest: the first one also packs its chunk and warms up).",
    )
    overwrite: bool = arg(
        False, "Replace a published sidecar; discard partial state that does not match."
    )
    seed: int = arg(1234, "Random seed (scoring is deterministic).")

    def __post_init__(self):
        try:
            LoadArgs.__post_init__(self)
            ModelArgs.__post_init__(self)
            TokenizerArgs.__post_init__(self)
        except ValueError as e:
            raise ScoringError(str(e)) from None
        self.data_prefix = blend_prefixes(self.data_prefix)
        if not self.data_prefix:
            raise ScoringError("--data-prefix: give at least one token dataset prefix")
        if not self.load:
            raise ScoringError("--load: the reference model checkpoint is required")
        check_at_least(
            self,
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "micro_batch_size",
            "commit_interval",
            error=ScoringError,
        )
        check_at_least(self, "seq_length", "stride", "max_docs", error=ScoringError, optional=True)
        if self.packing not in PACKINGS:
            raise ScoringError(
                f"--packing must be one of {', '.join(PACKINGS)}, got {self.packing!r}"
            )
        if self.packing == "length-sorted" and self.pipeline_model_parallel_size > 1:
            raise ScoringError(
                "--packing length-sorted needs --pipeline-model-parallel-size 1 (pipeline stages "
                "exchange fixed shapes); use --packing rows"
            )
        if self.documents_flag:
            packed_documents_spec(self.spec_impl, self.documents_flag)
        if self.dtype not in VALUE_DTYPES:
            raise ScoringError(
                f"--dtype must be one of {', '.join(VALUE_DTYPES)}, got {self.dtype!r}"
            )

    @property
    def packing_mode(self) -> str:
        if self.packing == "auto":
            return "rows" if self.pipeline_model_parallel_size > 1 else "length-sorted"
        return self.packing

    @property
    def documents_flag(self) -> str | None:
        """The flag that packs several documents per row (each attending only to itself), or
        None: one document per row."""
        if self.packing_mode != "rows":
            return None
        if self.packing == "rows":
            return "--packing rows"
        return "--packing auto with --pipeline-model-parallel-size > 1"
