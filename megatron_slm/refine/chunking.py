"""Split a document into the numbered chunks the chunk-level refining model sees (ProX's format).

Each line is shown with its 0-based, document-wide number, ``[{i:03d}]`` by default (three digits
minimum, more when needed; the numbers do not restart per chunk). Lines are packed greedily, in
order, while the chunk's token count (the sum of its numbered lines' counts, as ProX counts) stays
<= ``max_tokens``. A single line longer than ``max_tokens`` is never sent: it closes the current
chunk, is recorded in ``long_lines`` and stays in the document unchanged (splitting it would give
the model line numbers that do not exist in the document). With ``send_long_lines`` (``--semantics
prox``) such a line is sent as a chunk of its own, as ProX's code does (still recorded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_LINE_PREFIX = "[{i:03d}]"
"""ProX's own prefix (``f"[{idx_line:03d}]{line}"`` in GAIR-NLP/ProX), no space after it."""


@dataclass(frozen=True)
class Chunk:
    first_line: int
    last_line: int
    body: str
    """The numbered lines joined by newlines, without the ``[doc]`` wrapper."""
    tokens: int


def number_line(i: int, line: str, prefix: str = DEFAULT_LINE_PREFIX) -> str:
    return prefix.format(i=i) + line


def wrap_chunk(body: str) -> str:
    """The chunk as the model's user message: ``[doc]\\n...\\n[/doc]``."""
    return f"[doc]\n{body}\n[/doc]"


def split_into_chunks(
    text: str,
    count_tokens: Callable[[list[str]], list[int]],
    max_tokens: int = 1500,
    prefix: str = DEFAULT_LINE_PREFIX,
    send_long_lines: bool = False,
) -> tuple[list[Chunk], list[int]]:
    """``(chunks, long lines)`` of ``text``; ``count_tokens`` maps a list of strings to their token
    counts (one batched tokenizer call per document)."""
    numbered = [number_line(i, line, prefix) for i, line in enumerate(text.split("\n"))]
    counts = count_tokens(numbered)
    chunks: list[Chunk] = []
    long_lines: list[int] = []
    start, total = 0, 0

    def close(end: int) -> None:
        if end > start:
            chunks.append(Chunk(start, end - 1, "\n".join(numbered[start:end]), total))

    for i, n in enumerate(counts):
        if n > max_tokens:
            close(i)
            long_lines.append(i)
            if send_long_lines:
                chunks.append(Chunk(i, i, numbered[i], n))
            start, total = i + 1, 0
        elif total + n > max_tokens:
            close(i)
            start, total = i, n
        else:
            total += n
    close(len(numbered))
    return chunks, long_lines
