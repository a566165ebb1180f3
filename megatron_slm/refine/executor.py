"""Execute ProX programs on documents, with ProX's acceptance rule.

Two semantics (``--semantics``): ``strict`` (the default, below) parses each line as a Python call
(:mod:`megatron_slm.refine.program`) and counts every line it cannot apply as an error; ``prox``
(:mod:`megatron_slm.refine.prox_compat`) reproduces the released ProX code's decisions, quirks
included. They agree on well-formed programs; docs/design.md lists every difference.

Strict chunk-level semantics (ProX's, for well-formed programs):

* every ``normalize`` replaces all occurrences in the whole document, in program order, *before*
  any line is removed;
* ``remove_lines`` numbers are 0-based, document-wide (they do not restart per chunk) and inclusive
  at both ends, counted on the normalized document; overlapping ranges are merged; a range that
  starts past the last line is an error and removes nothing, one that ends past it is an error and
  is clamped to the last line;
* acceptance: words = whitespace-split tokens, ratio = words after / words before. ratio <=
  ``drop_ratio`` and errors < ``max_errors``: drop; else result <= ``drop_words`` words: drop; else
  errors < ``max_errors``: keep the refined text; else keep the original text. An empty or
  whitespace-only document is dropped.

Pure text: no torch, no tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_slm.refine import prox_compat
from megatron_slm.refine.program import (
    DropDoc,
    Normalize,
    ProgramError,
    RemoveLines,
    parse_program,
)

# Decisions recorded in metadata.prox.decision.
KEEP_REFINED = "refined"
KEEP_ORIGINAL = "original"  # the program had too many errors: ignored
KEEP_DOC = "keep"  # document level said keep (no chunk stage)
DROP_DOC = "drop_doc"
DROP_EMPTY = "drop_empty"
DROP_RATIO = "drop_ratio"
DROP_SHORT = "drop_short"
DROPPED = frozenset({DROP_DOC, DROP_EMPTY, DROP_RATIO, DROP_SHORT})

SEMANTICS = ("strict", "prox")


def _check_semantics(semantics: str) -> None:
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")


@dataclass(frozen=True)
class AcceptanceRule:
    drop_ratio: float = 0.05
    drop_words: int = 10
    max_errors: int = 2


@dataclass
class ChunkResult:
    text: str
    """The document to keep (refined or original); the original text when dropped."""
    decision: str
    errors: list[ProgramError] = field(default_factory=list)
    lines_removed: int = 0
    normalizations: int = 0
    words_before: int = 0
    words_after: int = 0
    """Words of the kept text; 0 when dropped."""

    @property
    def dropped(self) -> bool:
        return self.decision in DROPPED


@dataclass
class DocResult:
    decision: str
    errors: list[ProgramError] = field(default_factory=list)

    @property
    def dropped(self) -> bool:
        return self.decision in DROPPED


def execute_doc_program(program: str, semantics: str = "strict") -> DocResult:
    """Document-level program. strict: any ``drop_doc()`` drops; otherwise (keep, nothing
    parseable) the document is kept; errors are recorded but do not change the decision. prox:
    the substring ``drop`` anywhere drops; no errors."""
    _check_semantics(semantics)
    if semantics == "prox":
        return DocResult(DROP_DOC if prox_compat.doc_drops(program) else KEEP_DOC)
    parsed = parse_program(program, "doc")
    drop = any(isinstance(op, DropDoc) for _, op in parsed.operations)
    return DocResult(DROP_DOC if drop else KEEP_DOC, parsed.errors)


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1] + 1:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def apply_chunk_program(
    text: str, program: str, semantics: str = "strict"
) -> tuple[str, list[ProgramError], int, int]:
    """Run a chunk-level program on ``text``: ``(refined text, errors, lines removed,
    normalizations applied)``. No acceptance rule."""
    _check_semantics(semantics)
    if semantics == "prox":
        return prox_compat.apply_chunk_program(text, program)
    refined, errors, removed, normalizations, _ = _apply(text, program, None)
    return refined, errors, removed, normalizations


def _apply(text: str, program: str, words_before: int | None):
    """:func:`apply_chunk_program` plus the refined text's word count when it can be derived
    from ``words_before`` without splitting the whole text again (else None)."""
    parsed = parse_program(program, "chunk")
    errors = list(parsed.errors)
    normalizations = 0
    removals: list[tuple[int, RemoveLines]] = []
    for line_no, op in parsed.operations:
        if isinstance(op, Normalize):
            text = text.replace(op.source, op.target)
            normalizations += 1
        elif isinstance(op, RemoveLines):
            removals.append((line_no, op))
    # Words never span lines (a newline is whitespace), so the refined count is the original
    # minus the removed lines' words, as long as no normalization changed the text.
    derive = words_before is not None and normalizations == 0
    if not removals:
        return text, errors, 0, normalizations, words_before if derive else None
    lines = text.split("\n")
    last = len(lines) - 1
    intervals = []
    for line_no, op in removals:
        end = last if op.end is None else op.end
        if op.start > last:
            errors.append(
                ProgramError(line_no, f"range {op.start}..{end} outside the document (0..{last})")
            )
            continue
        if end > last:
            errors.append(ProgramError(line_no, f"range end {end} past the last line {last}"))
            end = last
        intervals.append((op.start, end))
    kept: list[str] = []
    position = 0
    removed = 0
    words_removed = 0
    for start, end in _merge(intervals):
        kept.extend(lines[position:start])
        removed += end - start + 1
        if derive:
            words_removed += sum(len(line.split()) for line in lines[start : end + 1])
        position = end + 1
    kept.extend(lines[position:])
    errors.sort(key=lambda e: e.line)
    words_after = words_before - words_removed if derive else None
    return "\n".join(kept), errors, removed, normalizations, words_after


def accept(
    original: str,
    refined: str,
    num_errors: int,
    rule: AcceptanceRule,
    words_before: int | None = None,
    words_after: int | None = None,
) -> tuple[str, int, int]:
    """ProX's acceptance rule: ``(decision, words before, words after)``; the word counts are
    computed when not given."""
    before = len(original.split()) if words_before is None else words_before
    after = len(refined.split()) if words_after is None else words_after
    if before == 0:
        return DROP_EMPTY, before, after
    if after / before <= rule.drop_ratio and num_errors < rule.max_errors:
        return DROP_RATIO, before, after
    if after <= rule.drop_words:
        return DROP_SHORT, before, after
    if num_errors < rule.max_errors:
        return KEEP_REFINED, before, after
    return KEEP_ORIGINAL, before, after


def execute_chunk_program(
    text: str, program: str, rule: AcceptanceRule = AcceptanceRule(), semantics: str = "strict"
) -> ChunkResult:
    """Run a chunk-level program on a whole document and apply the acceptance rule (the same
    rule in both semantics)."""
    _check_semantics(semantics)
    words_before = len(text.split())
    if semantics == "prox":
        refined, errors, removed, normalizations = prox_compat.apply_chunk_program(text, program)
        words_after = None
    else:
        refined, errors, removed, normalizations, words_after = _apply(text, program, words_before)
    decision, before, after = accept(text, refined, len(errors), rule, words_before, words_after)
    applied = decision == KEEP_REFINED
    return ChunkResult(
        text=refined if applied else text,
        decision=decision,
        errors=errors,
        lines_removed=removed if applied else 0,
        normalizations=normalizations if applied else 0,
        words_before=before,
        words_after=0 if decision in DROPPED else (after if applied else before),
    )
