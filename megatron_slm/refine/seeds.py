"""Turning teacher answers into ProX seed programs (pure text, no torch).

* document stage: the teacher's grades, educational value and format quality (0-5), become
  ``keep_doc()`` (edu >= 3, or edu = 2 and format >= 4) or ``drop_doc()`` (edu < 2); the rest is
  left out (ProX's labelling);
* chunk stage: the teacher's program is cleaned (code fences, a leading ``Program:``), parsed by the
  strict parser and executed; a program with any error, a line range outside its chunk, or a
  ``normalize`` whose source is not in the chunk is invalid (ProX's grammar check);
* existing programs (``--programs``): a document's ``doc_program`` is the label as it is; its
  document-wide ``chunk_program`` is cut into one program per chunk (:func:`chunk_part`).

A grade or program that cannot be read is *malformed*: counted by the caller, never a seed.
"""

from __future__ import annotations

import json
import re

from megatron_slm.refine.executor import apply_chunk_program
from megatron_slm.refine.program import DropDoc, Keep, Normalize, RemoveLines, parse_program

KEEP_PROGRAM = "keep_doc()"
DROP_PROGRAM = "drop_doc()"

# "Score: 3", "score = 3", "Educational score: **3**/5": the last such mention counts (the
# justification comes first and may quote the scale).
_SCORE = re.compile(r"score\s*(?:is|of|[:=])?\s*\**\s*([0-5])(?![0-9.])", re.IGNORECASE)


def parse_score(answer: str) -> int | None:
    """The 0-5 grade of a teacher answer, or None when there is none."""
    found = _SCORE.findall(answer)
    if found:
        return int(found[-1])
    bare = answer.strip().rstrip(".")
    return int(bare) if len(bare) == 1 and bare in "012345" else None


def doc_label(edu: int, fmt: int | None) -> str | None:
    """ProX's document label from the two grades; None = left out. ``fmt`` is only needed when
    ``edu == 2`` (the annotator asks for it only then)."""
    if edu >= 3:
        return KEEP_PROGRAM
    if edu < 2:
        return DROP_PROGRAM
    if fmt is None:
        raise ValueError("edu = 2 needs the format grade")
    return KEEP_PROGRAM if fmt >= 4 else None


def needs_format_grade(edu: int) -> bool:
    return edu == 2


def clean_program(answer: str) -> str:
    """The program lines of an answer: code fences, a ``Program:`` line and blank lines removed,
    each line stripped."""
    lines = []
    for raw in answer.split("\n"):
        line = raw.strip()
        if not line or line.startswith("```") or line.lower().rstrip(":") == "program":
            continue
        lines.append(line)
    return "\n".join(lines)


def check_chunk_program(program: str, text: str, first_line: int, last_line: int) -> str | None:
    """None when ``program`` is a valid program for document lines ``first_line..last_line`` of
    ``text``; else the reason it is not."""
    parsed = parse_program(program, "chunk")
    if parsed.errors:
        e = parsed.errors[0]
        return f"program line {e.line}: {e.reason}"
    if not parsed.operations:
        return "empty program"
    ops = [op for _, op in parsed.operations]
    if any(isinstance(op, Keep) for op in ops) and len(ops) > 1:
        return "keep_chunk() together with edits"
    chunk_text = "\n".join(text.split("\n")[first_line : last_line + 1])
    for line_no, op in parsed.operations:
        if isinstance(op, RemoveLines):
            end = op.end
            if end is None or op.start < first_line or end > last_line:
                shown = "all" if end is None else f"{op.start}..{end}"
                return (
                    f"program line {line_no}: range {shown} outside the chunk's lines "
                    f"{first_line}..{last_line}"
                )
        elif isinstance(op, Normalize) and op.source not in chunk_text:
            return f"program line {line_no}: normalize source {op.source!r:.40} not in the chunk"
    _, errors, _, _ = apply_chunk_program(text, program)
    if errors:
        return f"program line {errors[0].line}: {errors[0].reason}"
    return None


def doc_answer(program: str) -> tuple[str | None, str | None]:
    """``(keep_doc() or drop_doc(), None)`` for a document program that is one keep or drop call
    (``untouch_doc()`` is written ``keep_doc()``); else ``(None, reason)``."""
    parsed = parse_program(program, "doc")
    if parsed.errors:
        e = parsed.errors[0]
        return None, f"program line {e.line}: {e.reason}"
    if len(parsed.operations) != 1:
        return None, "empty program" if not parsed.operations else "more than one call"
    return (DROP_PROGRAM if isinstance(parsed.operations[0][1], DropDoc) else KEEP_PROGRAM), None


def render_call(op) -> str:
    """The canonical spelling of a chunk-level operation (``parse_program`` reads it back as
    ``op``): strings as JSON literals, which Python's literal syntax reads the same way."""
    if isinstance(op, RemoveLines):
        return f"remove_lines(line_start={op.start}, line_end={op.end})"
    if isinstance(op, Normalize):
        source = json.dumps(op.source, ensure_ascii=False)
        target = json.dumps(op.target, ensure_ascii=False)
        return f"normalize(source_str={source}, target_str={target})"
    return "keep_chunk()"


def chunk_part(operations: list, text: str, first_line: int, last_line: int) -> str:
    """The program of document lines ``first_line..last_line`` of ``text``, cut from the parsed
    document-wide chunk program ``operations`` (``(program line, op)`` pairs): its
    ``remove_lines`` ranges clipped to the chunk (a range over two chunks gives one call in each),
    the ``normalize`` calls whose source occurs in the chunk's text, in program order;
    ``keep_chunk()`` when none applies."""
    chunk_text = "\n".join(text.split("\n")[first_line : last_line + 1])
    calls = []
    for _, op in operations:
        if isinstance(op, RemoveLines):
            end = last_line if op.end is None else min(op.end, last_line)
            start = max(op.start, first_line)
            if start <= end:
                calls.append(render_call(RemoveLines(start, end)))
        elif isinstance(op, Normalize) and op.source in chunk_text:
            calls.append(render_call(op))
    return "\n".join(calls) if calls else render_call(Keep())
