"""The ProX program language: parse a program (one function call per line) into operations.

Arguments are Python literals parsed with :mod:`ast` (``ast.literal_eval`` on each argument, never
``eval``), so quotes, escapes, commas, ``=`` and parentheses inside strings work. The spellings the
released ProX models emit are accepted:

* document level: ``drop_doc()``, ``keep_doc()`` (``untouch_doc()`` = keep);
* chunk level: ``remove_lines(line_start=i, line_end=j)`` (also ``start=``/``end=`` keywords,
  positional ``remove_lines(i, j)``, and ProX's ``remove_lines(all=True)``),
  ``normalize(source_str="...", target_str="...")`` (positional too; a missing target is ``""``),
  ``keep_chunk()`` (``untouch_doc()``/``keep_doc()`` = keep).

Parsing never raises: every line that is not a valid call of the stage's language becomes a
:class:`ProgramError` with its 1-based program line and a reason. Blank lines are skipped.
"""

from __future__ import annotations

import ast
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

DOC_KEEP = ("keep_doc", "untouch_doc")
CHUNK_KEEP = ("keep_chunk", "untouch_doc", "keep_doc")


@dataclass(frozen=True)
class RemoveLines:
    """Remove document lines ``start..end`` (0-based, inclusive); ``end`` None = to the end."""

    start: int
    end: int | None


@dataclass(frozen=True)
class Normalize:
    source: str
    target: str


@dataclass(frozen=True)
class Keep:
    pass


@dataclass(frozen=True)
class DropDoc:
    pass


@dataclass(frozen=True)
class ProgramError:
    line: int
    """1-based line of the program."""
    reason: str


@dataclass
class Program:
    operations: list = field(default_factory=list)
    """``(program line, operation)`` pairs in program order."""
    errors: list[ProgramError] = field(default_factory=list)


class _BadLine(ValueError):
    pass


# Fast paths for the overwhelmingly common canonical forms; anything else goes through ast.
_CANONICAL_REMOVE = re.compile(
    r"remove_lines\(line_start=(0|[1-9][0-9]*), ?line_end=(0|[1-9][0-9]*)\)"
)
# A double-quoted string without backslashes, quotes or control characters means what it shows.
_CANONICAL_NORMALIZE = re.compile(
    r'normalize\(source_str="([^"\\\x00-\x1f]*)", ?target_str="([^"\\\x00-\x1f]*)"\)'
)
_CANONICAL_KEEP = {f"{name}()" for name in ("keep_chunk", "keep_doc", "untouch_doc", "drop_doc")}

_MAX_LINE_CHARS = 100_000  # a runaway generation is an error, not a parser stress test


def _literal_args(call: ast.Call) -> tuple[list, dict]:
    try:
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {}
        for kw in call.keywords:
            if kw.arg is None:
                raise _BadLine("**kwargs are not allowed")
            if kw.arg in kwargs:
                raise _BadLine(f"keyword {kw.arg!r} repeated")
            kwargs[kw.arg] = ast.literal_eval(kw.value)
    except _BadLine:
        raise
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        raise _BadLine(f"arguments must be literals ({type(e).__name__})") from None
    return args, kwargs


def _bind(name: str, args: list, kwargs: dict, params: list[list[str]]) -> list:
    """Bind positional and keyword arguments to ``params`` (each a list of accepted keyword
    spellings); returns the values with None for the absent ones."""
    if len(args) > len(params):
        raise _BadLine(f"{name}() takes at most {len(params)} arguments, got {len(args)}")
    values = list(args) + [None] * (len(params) - len(args))
    given = [i < len(args) for i in range(len(params))]
    for key, value in kwargs.items():
        slot = next((i for i, names in enumerate(params) if key in names), None)
        if slot is None:
            raise _BadLine(f"{name}() got an unexpected keyword {key!r}")
        if given[slot]:
            raise _BadLine(f"{name}() got two values for {params[slot][0]!r}")
        values[slot], given[slot] = value, True
    return values


def _line_number(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadLine(f"{what} must be an integer, got {value!r:.40}")
    if value < 0:
        raise _BadLine(f"{what} must be >= 0, got {value}")
    return value


def _remove_lines(args: list, kwargs: dict) -> RemoveLines:
    if not args and kwargs == {"all": True}:
        return RemoveLines(0, None)
    start, end = _bind("remove_lines", args, kwargs, [["line_start", "start"], ["line_end", "end"]])
    if start is None or end is None:
        raise _BadLine("remove_lines() needs line_start and line_end")
    start, end = _line_number(start, "line_start"), _line_number(end, "line_end")
    if start > end:
        raise _BadLine(f"reversed range {start}..{end}")
    return RemoveLines(start, end)


def _normalize(args: list, kwargs: dict) -> Normalize:
    source, target = _bind(
        "normalize", args, kwargs, [["source_str", "source"], ["target_str", "target"]]
    )
    target = "" if target is None else target
    if not isinstance(source, str) or not isinstance(target, str):
        raise _BadLine("normalize() needs string source_str and target_str")
    if source in ("", " "):
        raise _BadLine(f"normalize() source_str {source!r} is ignored")
    return Normalize(source, target)


def _no_args(name: str, args: list, kwargs: dict) -> None:
    if args or kwargs:
        raise _BadLine(f"{name}() takes no arguments")


def _parse_call(line: str):
    try:
        # "\d" in a string literal warns (DeprecationWarning, SyntaxWarning from 3.12): a warning
        # filter set to "error" must not turn a valid program line into an error
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(line, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise _BadLine("not a function call") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise _BadLine("not a function call")
    return call.func.id, *_literal_args(call)


@lru_cache(maxsize=65536)
def _parse_line(line: str, stage: str):
    """The operation of one stripped, non-empty program line, or the error reason (a str)."""
    if line in _CANONICAL_KEEP:
        name, args, kwargs = line[:-2], [], {}
    else:
        m = _CANONICAL_REMOVE.fullmatch(line)
        if m:
            start, end = int(m.group(1)), int(m.group(2))
            return RemoveLines(start, end) if start <= end else f"reversed range {start}..{end}"
        m = _CANONICAL_NORMALIZE.fullmatch(line)
        if m:
            try:
                return _normalize([], {"source_str": m.group(1), "target_str": m.group(2)})
            except _BadLine as e:
                return str(e)
        if len(line) > _MAX_LINE_CHARS:
            return f"line longer than {_MAX_LINE_CHARS} characters"
        try:
            name, args, kwargs = _parse_call(line)
        except _BadLine as e:
            return str(e)
    try:
        if stage == "doc":
            if name == "drop_doc":
                _no_args(name, args, kwargs)
                return DropDoc()
            if name in DOC_KEEP:
                _no_args(name, args, kwargs)
                return Keep()
        else:
            if name == "remove_lines":
                return _remove_lines(args, kwargs)
            if name == "normalize":
                return _normalize(args, kwargs)
            if name in CHUNK_KEEP:
                _no_args(name, args, kwargs)
                return Keep()
    except _BadLine as e:
        return str(e)
    return f"unknown {stage}-level function {name!r}"


def parse_program(text: str, stage: str) -> Program:
    """Parse ``text`` as a ``stage`` (``"doc"`` or ``"chunk"``) program; never raises."""
    if stage not in ("doc", "chunk"):
        raise ValueError(f"stage must be 'doc' or 'chunk', got {stage!r}")
    program = Program()
    for i, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line:
            continue
        result = _parse_line(line, stage)
        if isinstance(result, str):
            program.errors.append(ProgramError(i, result))
        else:
            program.operations.append((i, result))
    return program
