"""Unit tests of megatron_slm.data, plus small shared builders (imported by the test modules)."""

from __future__ import annotations

import json
import os

import numpy as np


def write_jsonl(path: str, records: list, raw_lines: dict[int, str] | None = None) -> str:
    """Write ``records`` as JSONL (``ensure_ascii=False``: real unicode bytes); ``raw_lines``
    replaces line ``i`` (1-based) with a raw string (to inject malformed lines)."""
    raw_lines = raw_lines or {}
    with open(path, "w", encoding="utf-8") as f:
        for i, rec in enumerate(records, start=1):
            f.write(raw_lines.get(i, json.dumps(rec, ensure_ascii=False)) + "\n")
    return path


def write_token_dataset(prefix: str, docs: list[list[int]], vocab_size: int = 1 << 17) -> str:
    """Write ``docs`` (lists of ids) as a megatron-core indexed dataset via NullTokenizer
    preprocessing (``vocab_size`` ids in all, EOD the last); returns the dataset prefix."""
    from megatron_slm.data import preprocess_corpus

    jsonl = prefix + ".jsonl"
    write_jsonl(jsonl, [{"text": " ".join(map(str, d))} for d in docs])
    out = preprocess_corpus(
        [jsonl], prefix, "NullTokenizer", vocab_size=vocab_size - 1, log_interval=0
    )
    os.remove(jsonl)
    return out["text"]


def write_sidecar(prefix: str, fn, dtype: str = "float32", order=None, chunk: int = 7, **kw):
    """Write a sidecar whose value at (doc, pos) is ``fn(doc, pos_array)``, ranges of ``chunk``
    documents written in ``order`` (default: reversed)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_slm.data import SidecarWriter

    ds = IndexedDataset(prefix)
    lengths = np.array(ds.sequence_lengths)  # copy while ds (owner of the mmap) is alive
    writer = SidecarWriter(prefix, dtype=dtype, reference=kw.pop("reference", "test-ref"), **kw)
    starts = list(range(0, len(lengths), chunk))
    for a in order(starts) if order else starts[::-1]:
        b = min(a + chunk, len(lengths))
        writer.write_range(a, [fn(d, np.arange(lengths[d])) for d in range(a, b)])
    return writer.finalize()
