"""Evaluation: perplexity on datasets and few-shot QA with greedy decoding (TP allowed)."""

from megatron_slm.evaluation.fewshot import (
    FewShotConfig,
    build_prompt,
    evaluate_fewshot,
    extract_answer,
    read_qa,
)
from megatron_slm.evaluation.generate import greedy_generate
from megatron_slm.evaluation.model import is_hf_dir, load_eval_model
from megatron_slm.evaluation.perplexity import (
    PerplexityResult,
    evaluate_perplexity,
    read_documents,
    segments,
)
from megatron_slm.evaluation.report import format_table, run_evaluation, write_report

__all__ = [
    "FewShotConfig",
    "PerplexityResult",
    "build_prompt",
    "evaluate_fewshot",
    "evaluate_perplexity",
    "extract_answer",
    "format_table",
    "greedy_generate",
    "is_hf_dir",
    "load_eval_model",
    "read_documents",
    "read_qa",
    "run_evaluation",
    "segments",
    "write_report",
]
