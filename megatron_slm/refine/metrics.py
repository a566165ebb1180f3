"""Program-quality metrics of a refining model against reference programs (pure text).

For held-out seed examples (``messages`` = system, user, reference program):

* document level: precision / recall / F1 of the *drop* class (a program drops when it contains
  ``drop_doc()``, as the executor decides);
* chunk level: line-removal F1, micro-averaged over all chunks: a line counts when a
  ``remove_lines`` range of the program covers it; only the chunk's own lines count (a range
  outside the chunk removes nothing of it); and normalize exact match: the fraction of chunks, among
  those where the model or the reference normalizes, whose ordered ``(source, target)`` lists equal;
* program error rate: the fraction of the model's programs with at least one parse error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from megatron_slm.refine.executor import execute_doc_program
from megatron_slm.refine.program import Normalize, RemoveLines, parse_program

_NUMBERED = re.compile(r"^\[(\d+)\]", re.MULTILINE)


def chunk_line_numbers(user_message: str) -> list[int]:
    """Document line numbers shown in a ``[doc]\\n[012]...\\n[/doc]`` chunk message."""
    return [int(m) for m in _NUMBERED.findall(user_message)]


def removed_lines(program: str, lines: list[int]) -> set[int]:
    """The lines of ``lines`` covered by the program's ``remove_lines`` ranges."""
    shown = set(lines)
    removed: set[int] = set()
    last = max(lines, default=-1)
    for _, op in parse_program(program, "chunk").operations:
        if isinstance(op, RemoveLines):
            end = last if op.end is None else op.end
            removed.update(i for i in range(op.start, min(end, last) + 1) if i in shown)
    return removed


def normalizations(program: str) -> list[tuple[str, str]]:
    return [
        (op.source, op.target)
        for _, op in parse_program(program, "chunk").operations
        if isinstance(op, Normalize)
    ]


def has_errors(program: str, stage: str) -> bool:
    return bool(parse_program(program, stage).errors)


def prf(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall, F1; an empty denominator gives 0 (and F1 0 when both are 0)."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


@dataclass
class Scores:
    doc: dict = field(default_factory=lambda: {"tp": 0, "fp": 0, "fn": 0, "tn": 0})
    line: dict = field(default_factory=lambda: {"tp": 0, "fp": 0, "fn": 0})
    normalize_compared: int = 0
    normalize_equal: int = 0
    programs: dict = field(default_factory=lambda: {"doc": 0, "chunk": 0})
    errors: dict = field(default_factory=lambda: {"doc": 0, "chunk": 0})

    def add_doc(self, predicted: str, reference: str) -> None:
        pred = execute_doc_program(predicted).dropped
        ref = execute_doc_program(reference).dropped
        key = ("tp" if ref else "fp") if pred else ("fn" if ref else "tn")
        self.doc[key] += 1
        self.programs["doc"] += 1
        self.errors["doc"] += has_errors(predicted, "doc")

    def add_chunk(self, user_message: str, predicted: str, reference: str) -> None:
        lines = chunk_line_numbers(user_message)
        pred, ref = removed_lines(predicted, lines), removed_lines(reference, lines)
        self.line["tp"] += len(pred & ref)
        self.line["fp"] += len(pred - ref)
        self.line["fn"] += len(ref - pred)
        pred_norm, ref_norm = normalizations(predicted), normalizations(reference)
        if pred_norm or ref_norm:
            self.normalize_compared += 1
            self.normalize_equal += pred_norm == ref_norm
        self.programs["chunk"] += 1
        self.errors["chunk"] += has_errors(predicted, "chunk")

    def report(self) -> dict:
        total = self.programs["doc"] + self.programs["chunk"]
        out = {"examples": dict(self.programs)}
        if self.programs["doc"]:
            doc = prf(self.doc["tp"], self.doc["fp"], self.doc["fn"])
            doc["tn"] = self.doc["tn"]
            doc["accuracy"] = (self.doc["tp"] + self.doc["tn"]) / self.programs["doc"]
            out["doc_drop"] = doc
        if self.programs["chunk"]:
            out["chunk_lines"] = prf(self.line["tp"], self.line["fp"], self.line["fn"])
            out["normalize_exact_match"] = (
                self.normalize_equal / self.normalize_compared if self.normalize_compared else None
            )
            out["normalize_compared"] = self.normalize_compared
        out["program_error_rate"] = (
            (self.errors["doc"] + self.errors["chunk"]) / total if total else 0.0
        )
        out["program_error_rate_by_stage"] = {
            s: self.errors[s] / self.programs[s] if self.programs[s] else None
            for s in ("doc", "chunk")
        }
        return out
