"""Settings of ``tools/compact_tokenizer.py``'s subcommands (one dataclass each; see ``cli``)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_slm.checkpoint import overwrite_arg
from megatron_slm.cli import arg, check_at_least
from megatron_slm.data.tokenizer import TokenizerArgs
from megatron_slm.errors import ConfigError
from megatron_slm.runtime.plan import LoadArgs

PRUNABLE_TOKENIZERS = ("SentencePieceTokenizer",)


def check_coverage(flag: str, *values: float) -> None:
    for c in values:
        if not 0 < c <= 1:
            raise ConfigError(f"{flag} must be in (0, 1], got {c}")


@dataclass
class CountConfig(TokenizerArgs):
    """``count``: id frequencies over indexed datasets (the tokenizer is recorded beside them)."""

    data_path: list[str] = arg(
        [], "Dataset prefixes (PREFIX.bin/.idx), or a blend W1 P1 W2 P2 ...", required=True
    )
    output: str | None = arg(None, "Counts file (.npy); its metadata goes to .json.", required=True)
    workers: int = arg(1, "Worker processes.")
    heldout: list[str] = arg(
        [], "Held-out JSONL files: the coverage curve adds the pruned model's tokens per byte."
    )
    heldout_json_key: str = arg("text", "JSON key of the held-out text.")
    heldout_max_docs: int = arg(1000, "Held-out documents to use.")
    curve_sizes: list[int] = arg(
        [], "Vocabulary sizes N of the coverage curve (default: 12, geometric up to every piece)."
    )
    curve_coverages: list[float] = arg(
        [0.99, 0.995, 0.999], "Coverages whose smallest N the curve shows (prune --coverage C)."
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.data_path:
            raise ConfigError("--data-path: give at least one dataset prefix")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.heldout_max_docs < 1:
            raise ConfigError("--heldout-max-docs must be >= 1")
        if any(n < 1 for n in self.curve_sizes):
            raise ConfigError(f"--curve-sizes must be >= 1, got {self.curve_sizes}")
        check_coverage("--curve-coverages", *self.curve_coverages)
        if self.heldout and (self.tokenizer_type or "SentencePieceTokenizer") not in (
            PRUNABLE_TOKENIZERS
        ):
            raise ConfigError(
                f"--heldout: the coverage curve needs a SentencePiece --tokenizer-model, not "
                f"--tokenizer-type {self.tokenizer_type} (only those can be pruned)"
            )
        if self.tokenizer_type == "GPT2BPETokenizer" or self.vocab_file or self.merge_file:
            if not (self.vocab_file and self.merge_file):
                raise ConfigError(
                    "--vocab-file and --merge-file are required: the counts record which "
                    "tokenizer made the data"
                )
        elif self.tokenizer_model is None and self.tokenizer_type != "NullTokenizer":
            raise ConfigError(
                "--tokenizer-model is required: the counts record which tokenizer made the data"
            )
        if self.output and not self.output.endswith(".npy"):
            raise ConfigError(f"--output must end in .npy, got {self.output!r}")


@dataclass
class PruneConfig:
    """``prune``: keep the N most useful pieces of a SentencePiece model."""

    tokenizer_model: str | None = arg(None, "The large SentencePiece .model.", required=True)
    tokenizer_type: str = arg("SentencePieceTokenizer", "Type of --tokenizer-model.")
    counts: str | None = arg(None, "Counts (.npy) written by `count` with this tokenizer.",
                             required=True)  # fmt: skip
    vocab_size: int | None = arg(None, "Pieces of the pruned model (N); or --coverage.")
    output: str | None = arg(None, "The pruned .model.", required=True)
    id_map: str | None = arg(None, "Id map to write (default: OUTPUT with .idmap.json).")
    report: str | None = arg(None, "Report to write (default: OUTPUT with .report.json).")
    heldout: list[str] = arg([], "Held-out JSONL files for tokens per byte before/after.")
    heldout_json_key: str = arg("text", "JSON key of the held-out text.")
    heldout_max_docs: int = arg(1000, "Held-out documents to use.")
    hidden_size: int = arg(2048, "Hidden size for the embedding parameters saved.")
    make_vocab_size_divisible_by: int = arg(128, "Vocabulary padding for the parameters saved.")
    coverage: float | None = arg(
        None,
        "Instead of --vocab-size: the smallest N whose kept pieces cover this share of the "
        "counted tokens, e.g. 0.995 (control, unknown, user-defined and byte pieces always kept; "
        "`count` prints the curve).",
    )

    def __post_init__(self):
        if self.tokenizer_type not in PRUNABLE_TOKENIZERS:
            raise ConfigError(
                f"--tokenizer-type {self.tokenizer_type} cannot be pruned: only a SentencePiece "
                "model (BPE or unigram) can"
            )
        if (self.vocab_size is None) == (self.coverage is None):
            raise ConfigError(
                "--vocab-size / --coverage: give exactly one (the pruned size N, or the share of "
                "counted tokens that chooses N)"
            )
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"--vocab-size must be >= 1, got {self.vocab_size}")
        if self.coverage is not None:
            check_coverage("--coverage", self.coverage)
        if self.output and not self.output.endswith(".model"):
            raise ConfigError(f"--output must end in .model, got {self.output!r}")
        check_at_least(self, "heldout_max_docs", "hidden_size", "make_vocab_size_divisible_by")


@dataclass
class RemapConfig(LoadArgs):
    """``remap-checkpoint``: a checkpoint's embedding and output rows for the pruned tokenizer.
    ``--load`` (trained with the large tokenizer), ``--device``, ``--tensor-model-parallel-size``
    (of this run and of the saved layout): ``LoadArgs``."""

    id_map: str | None = arg(None, "The .idmap.json written by `prune`.", required=True)
    save: str | None = arg(None, "Directory of the new checkpoint.", required=True)
    overwrite: bool = overwrite_arg()
    tokenizer_model: str | None = arg(
        None, "The pruned .model (default: the path the id map records)."
    )
    make_vocab_size_divisible_by: int | None = arg(
        None, "Vocabulary padding of the new checkpoint (default: the checkpoint's)."
    )
    pipeline_model_parallel_size: int = arg(1, "PP of this run (and of the saved layout).")

    def __post_init__(self):
        LoadArgs.__post_init__(self)
        check_at_least(self, "tensor_model_parallel_size", "pipeline_model_parallel_size")
        if self.make_vocab_size_divisible_by is not None and self.make_vocab_size_divisible_by < 1:
            raise ConfigError("--make-vocab-size-divisible-by must be >= 1")
