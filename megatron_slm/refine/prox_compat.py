"""``--semantics prox``: the decisions of ProX's released executor (GAIR-NLP/ProX,
``utils/doc_utils.py`` and ``utils/chunk_utils.py``), quirks included, written from its documented
behaviour so a corpus refined by the released models can be reproduced document for document.

The released code reads a program line by text slicing, not by parsing it:

* document level: the document is dropped when the substring ``drop`` occurs anywhere in the
  program (``drop_doc()``, ``dropped``, a comment...); there are no errors;
* chunk level: the program (stripped of spaces at both ends) is split on ``\\n`` and each line is
  looked at unstripped. A line starting with ``remove_lines`` (without ``all=True`` in it): the text
  between the first ``(`` and the first ``)`` is split on ``,``; piece 0 and 1, each taken after
  its first ``=``, go through ``int()``. A missing ``(`` is one error (line skipped); a missing
  ``)`` is one error and reading goes on to the line's last character but one; an unreadable number
  is one more error (line skipped). The range adds lines ``start..end`` (a reversed one adds
  nothing). A line starting with ``remove_lines`` with ``all=True`` anywhere removes every line. A
  line starting with ``normalize``: the same slicing; one piece is "delete the source" (applied
  whatever it is, ``" "`` deletes every space), two pieces are source and target (skipped without
  an error when the source is ``""`` or ``" "``), three or more (a comma in a string) are skipped
  silently. A value is the text after the piece's first ``=`` with ``"`` stripped from both ends:
  no escapes, single quotes kept. Every other line is ignored, without an error.
* normalizations run on the whole document in program order, then the lines are removed; then the
  ranges are merged (sorted by start; a range whose start is at most the previous end + 1 joins
  it) and each merged range starting past the last line is one error, each ending past it another.

Pure text, like the executor: no torch, no tokenizer.
"""

from __future__ import annotations

from megatron_slm.refine.program import ProgramError


def doc_drops(program: str) -> bool:
    """ProX's document-level decision: drop when ``drop`` appears anywhere."""
    return "drop" in program.strip(" ")


def _call_arguments(line: str, errors: list, line_no: int) -> list[str] | None:
    """The line's argument pieces as ProX slices them (None: the line is skipped)."""
    opening = line.find("(")
    if opening < 0:
        errors.append(ProgramError(line_no, "no '('"))
        return None
    closing = line.find(")")
    if closing < 0:
        errors.append(ProgramError(line_no, "no ')'"))
        closing = -1  # the released code then reads up to the line's last character but one
    return line[opening + 1 : closing].split(",")


def _value(piece: str) -> str:
    """The text after the piece's first ``=``, double quotes stripped (IndexError: no ``=``)."""
    return piece.split("=")[1].strip('"')


def _merge(ranges: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """ProX's interval merge on ``(start, end, program line)``: a stable sort by start, then a
    range joins the previous one when it starts at most one past its end (reversed ranges
    included, as they are)."""
    merged: list[tuple[int, int, int]] = []
    for start, end, line_no in sorted(ranges, key=lambda r: r[0]):
        if merged and start <= merged[-1][1] + 1:
            first, last, first_line = merged[-1]
            merged[-1] = (first, max(last, end), first_line)
        else:
            merged.append((start, end, line_no))
    return merged


def apply_chunk_program(text: str, program: str) -> tuple[str, list[ProgramError], int, int]:
    """``(refined text, errors, lines removed, normalizations applied)`` as ProX computes them;
    ``len(errors)`` is ProX's error count (the reasons and line numbers are ours)."""
    errors: list[ProgramError] = []
    ranges: list[tuple[int, int, int]] = []
    remove_all = False
    normalizations = 0
    for line_no, line in enumerate(program.strip(" ").split("\n"), 1):
        if line.startswith("remove_lines") and "all=True" not in line:
            pieces = _call_arguments(line, errors, line_no)
            if pieces is None:
                continue
            try:
                start, end = int(pieces[0].split("=")[1]), int(pieces[1].split("=")[1])
            except (IndexError, ValueError):
                errors.append(ProgramError(line_no, "line numbers not readable"))
                continue
            ranges.append((start, end, line_no))
        elif line.startswith("normalize"):
            pieces = _call_arguments(line, errors, line_no)
            if pieces is None:
                continue
            try:
                if len(pieces) == 1:
                    source, target = _value(pieces[0]), ""
                elif len(pieces) == 2:
                    source, target = _value(pieces[0]), _value(pieces[1])
                    if source in ("", " "):
                        continue  # skipped, not an error
                else:
                    continue  # a comma inside a string: skipped silently
            except IndexError:
                errors.append(ProgramError(line_no, "argument without '='"))
                continue
            text = text.replace(source, target)
            normalizations += 1
        elif line.startswith("remove_lines"):
            remove_all = True
    lines = text.split("\n")
    count = len(lines)
    if remove_all:
        removed = set(range(count))
    else:
        # the released code adds every number of range(start, end + 1) to a set; only those
        # inside the document matter (negative ones never match a line index)
        removed = set()
        for start, end, _ in ranges:
            removed.update(range(max(start, 0), min(end, count - 1) + 1))
    for start, end, line_no in _merge(ranges):
        if start >= count:
            errors.append(ProgramError(line_no, f"range {start}..{end} past the last line"))
        elif end >= count:
            errors.append(ProgramError(line_no, f"range end {end} past the last line"))
    errors.sort(key=lambda e: e.line)
    kept = [line for i, line in enumerate(lines) if i not in removed]
    return "\n".join(kept), errors, len(removed), normalizations
