"""Evaluation: perplexity on datasets, lm-evaluation-harness tasks through the ``megatron-slm``
model (``lm_eval_model``; imported only with lm-eval), Rho-1's math answer checking (TP allowed)."""

from megatron_slm.evaluation.model import is_hf_dir, load_eval_model
from megatron_slm.evaluation.perplexity import (
    PerplexityResult,
    evaluate_perplexity,
    read_documents,
    segments,
)
from megatron_slm.evaluation.report import format_table, run_evaluation, write_report

__all__ = [
    "PerplexityResult",
    "evaluate_perplexity",
    "format_table",
    "is_hf_dir",
    "load_eval_model",
    "read_documents",
    "run_evaluation",
    "segments",
    "write_report",
]
