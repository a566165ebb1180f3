"""One evaluation run: perplexity datasets and few-shot QA sets -> a JSON report and a table."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from megatron_slm.errors import InputFileError
from megatron_slm.evaluation.fewshot import FewShotConfig, evaluate_fewshot, read_qa
from megatron_slm.evaluation.perplexity import evaluate_perplexity, read_documents
from megatron_slm.runtime import LoadedModel


def _name_and_path(spec: str) -> tuple[str, str]:
    """``name=path`` or ``path`` (name: the file name without extension)."""
    if "=" in spec and not os.path.exists(spec):
        name, path = spec.split("=", 1)
        return name, path
    base = os.path.basename(spec.rstrip("/"))
    return (base[: -len(".jsonl")] if base.endswith(".jsonl") else base), spec


def check_inputs(
    perplexity_data: Sequence[str] = (),
    fewshot_data: Sequence[str] = (),
    shots_path: str | None = None,
) -> None:
    """Every data file exists (and an indexed dataset is consistent) before any model is loaded;
    raises ``InputFileError`` naming the flag and the path."""
    from megatron_slm.data.index_file import read_index

    for spec in perplexity_data:
        path = _name_and_path(spec)[1]
        if os.path.isfile(path):
            continue
        if not (os.path.exists(path + ".bin") or os.path.exists(path + ".idx")):
            raise InputFileError(
                "no such file, and no indexed dataset PATH.bin/.idx",
                subject=f"--perplexity-data {path}",
                hint="give a .jsonl file or a tokenized dataset prefix",
            )
        read_index(path, flag="--perplexity-data")
    for flag, paths in (("--fewshot-data", fewshot_data), ("--fewshot-shots", [shots_path])):
        for spec in paths:
            if spec is None:
                continue
            path = spec if flag == "--fewshot-shots" else _name_and_path(spec)[1]
            if not os.path.isfile(path):
                raise InputFileError("no such file", subject=f"{flag} {path}")


def run_evaluation(
    m: LoadedModel,
    *,
    perplexity_data: Sequence[str] = (),
    fewshot_data: Sequence[str] = (),
    seq_length: int = 1024,
    micro_batch_size: int = 4,
    json_key: str = "text",
    append_eod: bool = False,
    max_documents: int | None = None,
    fewshot: FewShotConfig | None = None,
    shots_path: str | None = None,
) -> dict:
    """Evaluate ``m`` on every dataset; the report (a JSON-serialisable dict)."""
    report: dict = {"model": m.source, "perplexity": [], "fewshot": []}
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
    cfg = fewshot or FewShotConfig()
    shots = read_qa(shots_path) if shots_path else None
    for spec in fewshot_data:
        name, path = _name_and_path(spec)
        report["fewshot"].append(evaluate_fewshot(m, read_qa(path), cfg, shots, name, path))
    return report


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
    if report["fewshot"]:
        lines.append("")
        lines.append(f"{'qa set':<24} {'shots':>6} {'questions':>10} {'correct':>8} {'EM':>8}")
        for r in report["fewshot"]:
            lines.append(
                f"{r['name']:<24} {r['num_shots']:>6} {r['questions']:>10} {r['correct']:>8} "
                f"{100 * r['exact_match']:>7.2f}%"
            )
    return "\n".join(lines)


def write_report(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)
