"""A chunk of documents made ready for the device: its token ids checked, its batches built (inputs
in pinned memory for a GPU), and the array its values are scattered into.

Runs in the scorer's prefetch thread (:class:`~megatron_slm.scoring.pipeline.Prefetcher`), ahead of
the model: nothing here touches the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_slm.scoring.config import ScoringError
from megatron_slm.scoring.packing import (
    HostBatch,
    length_sorted_host_batches,
    packed_row_host_batches,
    segment_table,
)


@dataclass
class ChunkLayout:
    """How every chunk of one run is cut and batched (the same on every rank and every run)."""

    seq_length: int
    stride: int
    micro_batch_size: int
    packing: str
    """``length-sorted`` or ``rows`` (``ScoreConfig.packing_mode``)."""
    pipeline_parallel: int
    """PP size: with PP > 1 a chunk's batches are one pipeline schedule of one shape."""
    pin: bool = False
    """Page-locked inputs (CUDA: the copies to the device are asynchronous)."""


@dataclass
class PreparedChunk:
    """Documents ``first_doc .. first_doc + len(lengths) - 1``, ready to score."""

    first_doc: int
    lengths: np.ndarray
    """``[n_docs]`` int64 token counts."""
    offsets: np.ndarray
    """``[n_docs + 1]`` start of each document in :attr:`values` (and the end)."""
    schedules: list[list[HostBatch]]
    """One list per call of the model (one batch each with PP = 1; the whole chunk with PP > 1)."""
    values: np.ndarray
    """``[n_tokens]`` float32, NaN until the losses are scattered in (the host worker)."""

    def document_values(self) -> list[np.ndarray]:
        """One ``[len(doc)]`` view of :attr:`values` per document."""
        return np.split(self.values, self.offsets[1:-1])

    def stats(self) -> np.ndarray:
        """``[documents, tokens, sum of finite values, number of finite values]`` float64."""
        flat = self.values.astype(np.float64)
        ok = np.isfinite(flat)
        return np.array([len(self.lengths), len(flat), flat[ok].sum(), ok.sum()])


def chunk_bounds(chunk: int, interval: int, n_docs: int) -> tuple[int, int]:
    """``[first, end)`` documents of chunk ``chunk``."""
    return chunk * interval, min((chunk + 1) * interval, n_docs)


def check_ids(
    prefix: str, tokens: np.ndarray, offsets: np.ndarray, first: int, end: int, vocab_limit: int
) -> None:
    """ScoringError when documents ``first .. end - 1`` hold an id outside the vocabulary."""
    lo, hi = int(offsets[first]), int(offsets[end])
    if hi <= lo:
        return
    biggest = int(tokens[lo:hi].max())
    if biggest >= vocab_limit:
        raise ScoringError(
            f"--data-prefix {prefix}: documents {first}..{end - 1} contain token id {biggest}, "
            f"outside the vocabulary of the reference model/tokenizer ({vocab_limit} ids)"
        )


def prepare_chunk(
    tokens: np.ndarray, offsets: np.ndarray, first: int, end: int, layout: ChunkLayout
) -> PreparedChunk:
    """Documents ``first .. end - 1`` of a token dataset (``tokens`` ``[n]``, all documents back to
    back; ``offsets`` ``[n_docs + 1]``) as a :class:`PreparedChunk`."""
    lo = int(offsets[first])
    ids = np.asarray(tokens[lo : int(offsets[end])], dtype=np.int64)  # [n_tokens of the chunk]
    local = np.asarray(offsets[first : end + 1], dtype=np.int64) - lo  # [n_docs + 1]
    lengths = np.diff(local)
    table = segment_table(lengths, layout.seq_length, layout.stride)
    seq, mbs = layout.seq_length, layout.micro_batch_size
    if layout.packing == "length-sorted":
        batches = length_sorted_host_batches(table, ids, local, mbs * seq, layout.pin)
    else:
        pad = layout.pipeline_parallel > 1  # pipeline stages exchange one shape
        batches = packed_row_host_batches(table, ids, local, seq, mbs, pad, layout.pin)
    if layout.pipeline_parallel > 1:
        schedules = [batches] if batches else []
    else:
        schedules = [[b] for b in batches]
    values = np.full(len(ids), np.nan, dtype=np.float32)
    return PreparedChunk(first, lengths, local, schedules, values)
