"""Line-by-line JSONL reading for the small tools (evaluation sets, tokenizer training).

Bulk preprocessing has its own batched, parallel reader (``megatron_slm.data.preprocess``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from megatron_slm.errors import InputFileError


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line; a malformed line is a ValueError naming
    the file and the line."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputFileError(f"{path}:{line_no}: invalid JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise InputFileError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, record
