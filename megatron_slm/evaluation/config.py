"""Settings of ``tools/evaluate.py`` (the CLI is generated from them)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_slm.cli import arg, check_at_least
from megatron_slm.data.tokenizer import TokenizerArgs
from megatron_slm.errors import ConfigError
from megatron_slm.models.args import ModelArgs
from megatron_slm.runtime.plan import LoadArgs


@dataclass
class EvaluateConfig(LoadArgs, ModelArgs, TokenizerArgs):
    """``--load``, ``--device``, ``--tensor-model-parallel-size``: ``LoadArgs`` (world = TP x
    replicas)."""

    output: str | None = arg(None, "JSON report path.")
    perplexity_data: list[str] = arg(
        [], "[name=]path ...: JSONL files or indexed dataset prefixes.", nargs="*"
    )
    seq_length: int | None = arg(
        None,
        "Longest scored segment (default: the model's training --seq-length, else its "
        "max_position_embeddings).",
    )
    micro_batch_size: int = arg(4, "Segments (perplexity) or lm-eval requests per forward.")
    json_key: str = arg("text", "JSONL field holding the text.")
    append_eod: bool = arg(False, "Score an EOD after each document.")
    max_documents: int | None = arg(None, "Evaluate at most this many documents per dataset.")
    lm_eval_tasks: list[str] = arg(
        [],
        "lm-eval tasks or tags, e.g. gsm8k_rho1 math_rho1 (rho1_math), qa_local, arc_easy; "
        "megatron-slm's tasks (megatron_slm/evaluation/tasks) are always included.",
        nargs="*",
    )
    lm_eval_include_path: list[str] = arg([], "More lm-eval task directories.", nargs="*")
    lm_eval_metadata: str | None = arg(
        None, 'JSON passed to the tasks, e.g. \'{"qa_path": "qa.jsonl"}\' (local data).'
    )
    num_fewshot: int | None = arg(None, "lm-eval --num_fewshot (default: each task's own).")
    limit: int | None = arg(None, "lm-eval --limit: at most this many examples per task.")

    def __post_init__(self):
        LoadArgs.__post_init__(self)
        ModelArgs.__post_init__(self)
        TokenizerArgs.__post_init__(self)
        if not self.perplexity_data and not self.lm_eval_tasks:
            raise ConfigError("nothing to do: give --perplexity-data and/or --lm-eval-tasks")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError("--num-fewshot must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be >= 1")
        self.lm_eval_options()  # a bad --lm-eval-metadata fails here, before any loading
        check_at_least(self, "tensor_model_parallel_size", "micro_batch_size")
        if self.seq_length is not None and self.seq_length < 2:
            raise ConfigError("--seq-length must be >= 2")

    def lm_eval_options(self) -> dict:
        """Keyword arguments of ``harness.run_lm_eval`` beyond the model, tasks and batch."""
        from megatron_slm.evaluation.harness import parse_metadata

        return {
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "include_paths": list(self.lm_eval_include_path),
            "metadata": parse_metadata(self.lm_eval_metadata),
        }
