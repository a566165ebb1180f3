"""One evaluation run: perplexity datasets and lm-eval tasks -> a JSON report and a table."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from megatron_slm.atomic_io import write_text_atomic
from megatron_slm.evaluation.perplexity import evaluate_perplexity, read_documents
from megatron_slm.runtime import LoadedModel


def _name_and_path(spec: str) -> tuple[str, str]:
    """``name=path`` or ``path`` (name: the file name without extension)."""
    if "=" in spec and not os.path.exists(spec):
        name, path = spec.split("=", 1)
        return name, path
    base = os.path.basename(spec.rstrip("/"))
    return (base[: -len(".jsonl")] if base.endswith(".jsonl") else base), spec


def check_inputs(perplexity_data: Sequence[str] = ()) -> None:
    """Every data file exists (and an indexed dataset is consistent) before any model is loaded;
    raises ``InputFileError`` naming the flag and the path."""
    from megatron_slm.evaluation.perplexity import check_documents

    for spec in perplexity_data:
        check_documents(_name_and_path(spec)[1])


def run_evaluation(
    m: LoadedModel,
    *,
    perplexity_data: Sequence[str] = (),
    seq_length: int = 1024,
    micro_batch_size: int = 4,
    json_key: str = "text",
    append_eod: bool = False,
    max_documents: int | None = None,
    lm_eval_tasks: Sequence[str] = (),
    lm_eval_options: dict | None = None,
) -> dict:
    """Evaluate ``m`` on every dataset; the report (a JSON-serialisable dict)."""
    report: dict = {"model": m.source, "perplexity": [], "lm_eval": {}}
    for spec in perplexity_data:
        name, path = _name_and_path(spec)
        docs = read_documents(path, m.tokenizer, json_key, append_eod)
        result = evaluate_perplexity(
            m,
            docs,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            name=name,
            path=path,
            max_documents=max_documents,
        )
        report["perplexity"].append(result.as_dict())
    if lm_eval_tasks:
        from megatron_slm.evaluation.harness import run_lm_eval

        out = run_lm_eval(m, lm_eval_tasks, batch_size=micro_batch_size, **(lm_eval_options or {}))
        if out is not None:  # None on the processes that do not write results
            report["lm_eval"] = _plain(out["results"])
            report["lm_eval_config"] = _plain({k: out.get(k) for k in ("n-shot", "n-samples")})
    return report


def _plain(value):
    """lm-eval results as JSON-serialisable values (numpy scalars, NaN-free strings kept)."""
    return json.loads(
        json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    )


def format_table(report: dict) -> str:
    """A readable summary of a report."""
    lines = [f"model: {report['model']}"]
    if report["perplexity"]:
        lines.append("")
        lines.append(f"{'dataset':<24} {'documents':>10} {'tokens':>12} {'loss':>10} {'ppl':>12}")
        for r in report["perplexity"]:
            lines.append(
                f"{r['name']:<24} {r['documents']:>10} {r['tokens']:>12} "
                f"{r['mean_loss']:>10.4f} {r['perplexity']:>12.4f}"
            )
    if report.get("lm_eval"):
        lines.append("")
        lines.append(f"{'lm-eval task':<24} {'metric':<24} {'value':>10}")
        for task, metrics in report["lm_eval"].items():
            for key, value in metrics.items():
                if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                lines.append(f"{task:<24} {key.split(',')[0]:<24} {value:>10.4f}")
    return "\n".join(lines)


def write_report(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=2))
