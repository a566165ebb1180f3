"""Document packing, length-sorted batching and sliding windows for reference scoring.

A document of ``n`` tokens has ``n - 1`` predictions: token ``i >= 1`` given tokens ``0 .. i-1``.
Its *input* is ``tokens[:-1]`` and its *labels* ``tokens[1:]``, so it occupies ``n - 1`` row
positions (the last token is never an input: its logits would predict nothing).

* Documents with ``n - 1 <= seq_length`` are one *segment* each. Two ways to batch segments:

  - packed rows (:func:`pack_rows` + :func:`make_batches`): several segments per row of
    ``seq_length`` positions; every segment sees only itself (block-diagonal causal mask), so its
    losses are those of the document alone. Fixed shapes: the only way with pipeline parallelism.
  - length-sorted batches (:func:`length_sorted_batches`, the default with PP = 1): one segment per
    row from position 0, rows of similar length together, plain causal attention. Faster on CPU
    (tiny model, seq 256, 1 thread): a masked 8 x 256 forward took 45.1 ms against 38.6 ms
    causal, and attention over short rows costs less; end to end the scoring/training ratio of
    ``benchmarks/bench_score_corpus.py`` went from 2.18 to 2.48 (median of paired runs).
* Longer documents are split into sliding windows of ``seq_length`` inputs started every
  ``stride`` tokens; the last window stops at the document's end (it is shorter, and packed with
  other segments, instead of being moved back over already scored tokens). A window keeps only the
  predictions that no earlier window made, so every token is scored exactly once, and every kept
  prediction has at least ``seq_length - stride`` tokens of context (``+ 1``: the window's first
  kept label ``j`` sees inputs ``start .. j - 1``). Cost: a token of a long document is forwarded
  about ``seq_length / stride`` times.

Packed rows are filled with first-fit decreasing (segments sorted by length, longest first, each
placed in the first row with room; ties keep document order). Both batchings are deterministic
functions of the documents, so a rerun batches the same documents the same way and produces the
same bytes. Measured fill (chunks of 250 lognormal documents, median seq_length / 3): 99% of
positions for packed rows, 94% for length-sorted batches. Length buckets (short rows for
short documents: attention is ~30% of a tiny-model forward at 256 positions, a 32 x 64 batch ran
21% faster than 8 x 256) were tried and dropped: segments longer than half a bucket's row cannot
share a row, so the fill fell to 86-88% and ate the gain.

Position ids count from 0 in every segment, a window of a long document included, as in a training
row: a learned position table (GPT-3's architecture) sees each segment as it saw training rows,
and never a position beyond ``seq_length``. RoPE reads none of them (it rotates by the position in
the row, and only distances matter).

Segment ids mark the padding too (``-1``, one segment of its own): a padding query then always
sees at least itself, so the attention softmax never has an all-masked row (which would give NaN,
and NaN values times a zero probability would leak into real rows).

The scorer itself uses the array versions at the end of this module (:func:`segment_table`,
:func:`length_sorted_host_batches`, :func:`packed_row_host_batches`): the same rows in the same
batches as the per-segment functions above (which stay as the readable reference the tests
compare against), built without a Python object per segment, as :class:`HostBatch` es with their
inputs in one ``[3, b, s]`` (pinned) buffer and the scatter of their kept losses precomputed.
Packing 760k tokens (6000 documents, seq 256) takes 0.09 s on one CPU core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_slm.errors import ConfigError
from megatron_slm.models.document_mask import DocumentMask

__all__ = [
    "Batch",
    "HostBatch",
    "Segment",
    "document_segments",
    "length_sorted_batches",
    "length_sorted_host_batches",
    "make_batches",
    "pack_rows",
    "packed_row_host_batches",
    "plan_windows",
    "scatter_losses",
    "segment_table",
]


@dataclass(frozen=True)
class Segment:
    """A contiguous piece of one document placed in one row.

    Inputs are ``doc_tokens[start : start + length]``, labels ``doc_tokens[start + 1 : start +
    length + 1]``; predictions ``j >= keep_from`` of the segment are kept and give the values of
    document positions ``start + 1 + j``.
    """

    doc: int
    """Document index (``IndexedDataset`` sequence) in the token dataset."""
    start: int
    """First input token of the segment within the document."""
    length: int
    """Number of input positions (= predictions)."""
    keep_from: int
    """First prediction of the segment whose loss is kept (earlier ones are context only)."""
    row: int = -1
    """Row of the packed batch list (set by :func:`pack_rows`)."""
    offset: int = -1
    """First position of the segment in its row (set by :func:`pack_rows`)."""


def plan_windows(n_tokens: int, seq_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, length, keep_from)`` of the segments scoring a document of ``n_tokens`` tokens.

    One segment when ``n_tokens - 1 <= seq_length``; otherwise windows of ``seq_length`` inputs at
    ``0, stride, 2 * stride, ...``, the last one cut at the document's end. None for a document of
    one token (nothing to predict).
    """
    if not 1 <= stride <= seq_length:
        raise ConfigError(f"--stride must be in [1, --seq-length {seq_length}], got {stride}")
    n_pred = n_tokens - 1
    if n_pred <= 0:
        return []
    if n_pred <= seq_length:
        return [(0, n_pred, 0)]
    windows = [(0, seq_length, 0)]
    scored_end = seq_length  # last document position scored so far
    start = 0
    while scored_end < n_pred:
        start += stride
        length = min(seq_length, n_pred - start)
        windows.append((start, length, scored_end - start))
        scored_end = start + length
    return windows


def document_segments(
    docs: list[int], lengths: list[int] | np.ndarray, seq_length: int, stride: int
) -> list[Segment]:
    """The (unplaced) segments scoring ``docs`` (token counts ``lengths``), in document order."""
    items: list[Segment] = []
    for d, n in zip(docs, lengths):
        for start, length, keep in plan_windows(int(n), seq_length, stride):
            items.append(Segment(int(d), start, length, keep))
    return items


def pack_rows(items: list[Segment], row_length: int) -> tuple[list[Segment], int]:
    """Place ``items`` into rows of ``row_length`` positions by first-fit decreasing.

    Returns ``(segments with row/offset, number of rows)``, listed in row order, then by offset.
    """
    order = sorted(range(len(items)), key=lambda i: (-items[i].length, i))
    free = np.zeros(0, dtype=np.int64)  # [rows] free positions of each row
    placed: list[Segment] = []
    for i in order:
        seg = items[i]
        if seg.length > row_length:
            raise ValueError(f"segment of {seg.length} positions > row length {row_length}")
        fits = np.flatnonzero(free >= seg.length)
        if len(fits):
            row = int(fits[0])
        else:
            row = len(free)
            free = np.append(free, row_length)
        offset = row_length - int(free[row])
        free[row] -= seg.length
        placed.append(
            Segment(seg.doc, seg.start, seg.length, seg.keep_from, row=row, offset=offset)
        )
    placed.sort(key=lambda s: (s.row, s.offset))
    return placed, len(free)


@dataclass
class Batch:
    """One micro-batch of packed rows (batch-first, like the model's inputs)."""

    tokens: torch.Tensor
    """``[b, s]`` int64 input ids (padding: 0)."""
    labels: torch.Tensor
    """``[b, s]`` int64 next-token ids (padding: 0)."""
    position_ids: torch.Tensor
    """``[b, s]`` int64 position of each input within its document (reset per segment)."""
    attention_mask: DocumentMask | None
    """Block-diagonal causal attention: the segment id of each position (padding ``-1``); None
    when every row is one full-length segment (plain causal attention, the fast path)."""
    segments: list[Segment]
    """Segments of these rows; ``row`` is the row index within this batch."""
    num_real_rows: int
    """Rows carrying segments (the rest are padding rows added to reach the micro-batch size)."""


def make_batches(
    segments: list[Segment],
    num_rows: int,
    doc_tokens: dict[int, np.ndarray],
    seq_length: int,
    micro_batch_size: int,
    pad_last: bool = True,
) -> list[Batch]:
    """Group packed rows into micro-batches of ``micro_batch_size`` rows.

    Args:
        segments: output of :func:`pack_rows`.
        num_rows: number of rows of :func:`pack_rows`.
        doc_tokens: document index -> its token ids ``[n]``.
        seq_length: row length.
        micro_batch_size: rows per batch.
        pad_last: pad the last batch with empty rows, so every batch has the same shape
            (pipeline parallelism needs it); else the last batch is smaller.
    """
    s, mbs = seq_length, micro_batch_size
    n_batches = -(-num_rows // mbs)
    total = n_batches * mbs
    tokens = np.zeros((total, s), dtype=np.int64)
    labels = np.zeros((total, s), dtype=np.int64)
    positions = np.zeros((total, s), dtype=np.int64)
    seg_ids = np.full((total, s), -1, dtype=np.int64)
    full_rows = np.arange(total) >= num_rows  # padding rows: one causal segment, like a full row
    for k, seg in enumerate(segments):
        ids = doc_tokens[seg.doc]
        lo, hi = seg.offset, seg.offset + seg.length
        tokens[seg.row, lo:hi] = ids[seg.start : seg.start + seg.length]
        labels[seg.row, lo:hi] = ids[seg.start + 1 : seg.start + seg.length + 1]
        positions[seg.row, lo:hi] = np.arange(seg.length)
        seg_ids[seg.row, lo:hi] = k
        full_rows[seg.row] = seg.length == s
    batches = []
    by_row: dict[int, list[Segment]] = {}
    for seg in segments:
        by_row.setdefault(seg.row, []).append(seg)
    for b in range(n_batches):
        rows = slice(b * mbs, (b + 1) * mbs if pad_last else min((b + 1) * mbs, num_rows))
        if full_rows[rows].all():
            mask = None
        else:  # block-diagonal causal: [b, s] segment ids, not an s x s mask to copy
            mask = DocumentMask(torch.from_numpy(seg_ids[rows]))
        segs = [
            Segment(g.doc, g.start, g.length, g.keep_from, row=g.row - b * mbs, offset=g.offset)
            for r in range(b * mbs, min((b + 1) * mbs, num_rows))
            for g in by_row.get(r, [])
        ]
        batches.append(
            Batch(
                tokens=torch.from_numpy(tokens[rows]),
                labels=torch.from_numpy(labels[rows]),
                position_ids=torch.from_numpy(positions[rows]),
                attention_mask=mask,
                segments=segs,
                num_real_rows=min(mbs, num_rows - b * mbs),
            )
        )
    return batches


def length_sorted_batches(
    items: list[Segment], doc_tokens: dict[int, np.ndarray], positions_per_batch: int
) -> list[Batch]:
    """One segment per row, rows of similar length batched together, no attention mask.

    Segments are sorted by length (longest first, ties in document order) and cut into batches of
    at most ``positions_per_batch`` positions (``rows x longest segment``); each row holds one
    segment from position 0, padded at the end, so plain causal attention is exact (padding comes
    after every real token) and costs ``O(segment length)`` per token instead of ``O(row length)``.
    Batch shapes vary, so this is for PP = 1 only.
    """
    order = sorted(range(len(items)), key=lambda i: (-items[i].length, i))
    groups: list[list[Segment]] = []
    for i in order:
        seg = items[i]
        if groups and (len(groups[-1]) + 1) * groups[-1][0].length <= positions_per_batch:
            groups[-1].append(seg)
        else:
            groups.append([seg])
    batches = []
    for group in groups:
        width = group[0].length
        tokens = np.zeros((len(group), width), dtype=np.int64)
        labels = np.zeros((len(group), width), dtype=np.int64)
        positions = np.zeros((len(group), width), dtype=np.int64)
        placed = []
        for row, seg in enumerate(group):
            ids = doc_tokens[seg.doc]
            tokens[row, : seg.length] = ids[seg.start : seg.start + seg.length]
            labels[row, : seg.length] = ids[seg.start + 1 : seg.start + seg.length + 1]
            positions[row, : seg.length] = np.arange(seg.length)
            placed.append(Segment(seg.doc, seg.start, seg.length, seg.keep_from, row=row, offset=0))
        batches.append(
            Batch(
                tokens=torch.from_numpy(tokens),
                labels=torch.from_numpy(labels),
                position_ids=torch.from_numpy(positions),
                attention_mask=None,
                segments=placed,
                num_real_rows=len(group),
            )
        )
    return batches


def scatter_losses(batch: Batch, losses: np.ndarray, values: dict[int, np.ndarray]) -> None:
    """Copy the kept per-token losses of ``batch`` into the per-document value arrays.

    Args:
        batch: the batch the losses belong to.
        losses: ``[b, s]`` float32 per-position losses of the batch.
        values: document index -> ``[n]`` float32 values (NaN-initialised), filled in place.
    """
    for seg in batch.segments:
        row = losses[seg.row, seg.offset + seg.keep_from : seg.offset + seg.length]
        first = seg.start + 1 + seg.keep_from
        values[seg.doc][first : first + len(row)] = row


# ---------------------------------------------------------------------------------------------
# The scorer's batches: vectorised, one host buffer per batch, scatter plan precomputed
# ---------------------------------------------------------------------------------------------
DOC, START, LENGTH, KEEP = range(4)
"""Columns of :func:`segment_table`."""


def segment_table(lengths: np.ndarray, seq_length: int, stride: int) -> np.ndarray:
    """``[n_segments, 4]`` int64 (document index into ``lengths``, start, length, keep_from): the
    segments of :func:`document_segments` for documents ``0 .. len(lengths) - 1``, in the same
    (document) order, without a Python object per segment (most documents are one segment)."""
    n = np.asarray(lengths, dtype=np.int64)
    short = np.flatnonzero((n >= 2) & (n - 1 <= seq_length))
    parts = [np.stack([short, np.zeros_like(short), n[short] - 1, np.zeros_like(short)], 1)]
    for d in np.flatnonzero(n - 1 > seq_length):  # sliding windows: few documents
        windows = plan_windows(int(n[d]), seq_length, stride)
        parts.append(np.array([(d, *w) for w in windows], dtype=np.int64))
    table = np.concatenate(parts).reshape(-1, 4)
    return table[np.argsort(table[:, DOC], kind="stable")]  # windows of a document stay in order


@dataclass
class HostBatch:
    """One micro-batch as the scorer's pipeline moves it: the inputs in one host buffer (one copy
    to the device), and where each kept loss goes among its chunk's values."""

    data: torch.Tensor
    """``[3, b, s]`` int64: input ids, labels, position ids (padding: 0); pinned for CUDA."""
    attention_mask: DocumentMask | None
    """The segment ids of packed rows (``[b, s]``, pinned for CUDA), or None (plain causal)."""
    src: np.ndarray
    """``[k]`` flat index (``row * s + column``) of each kept loss in the batch's ``[b, s]``."""
    dest: np.ndarray
    """``[k]`` index of each kept loss in the chunk's values (documents back to back)."""

    def scatter(self, losses: np.ndarray, values: np.ndarray) -> None:
        """``losses [b, s]`` of this batch -> ``values`` (the chunk's flat values), in place."""
        values[self.dest] = np.ravel(losses)[self.src]


def _host_buffer(n: int, pin: bool) -> tuple[torch.Tensor, np.ndarray]:
    """``[n]`` int64 host buffer (page-locked with ``pin``) and a numpy view of it."""
    if pin:
        t = torch.empty(n, dtype=torch.int64, pin_memory=True)
        return t, t.numpy()
    a = np.empty(n, dtype=np.int64)
    return torch.from_numpy(a), a


def length_sorted_host_batches(
    table: np.ndarray,
    tokens: np.ndarray,
    doc_offsets: np.ndarray,
    positions_per_batch: int,
    pin: bool = False,
) -> list[HostBatch]:
    """:func:`length_sorted_batches` of the segments ``table`` (:func:`segment_table`): the same
    rows in the same batches, built for the whole chunk at once with array operations (a few
    dozen numpy calls per chunk instead of a dozen per batch: the prefetch thread then holds the
    interpreter lock less, which the main thread launching the model needs).

    Args:
        table: ``[n_segments, 4]`` segments; their document index points into ``doc_offsets``.
        tokens: ``[n]`` int64 token ids of the documents, back to back.
        doc_offsets: ``[n_docs + 1]`` start of each document in ``tokens`` (and the end).
        positions_per_batch: most ``rows x longest segment`` per batch.
        pin: page-locked inputs (asynchronous copies to a GPU).
    """
    seg = table[np.argsort(-table[:, LENGTH], kind="stable")]  # [R, 4] longest first
    n_rows = len(seg)
    if not n_rows:
        return []
    firsts, i = [], 0  # first row of each batch: a batch is as wide as its first (longest) row
    while i < n_rows:
        firsts.append(i)
        i += max(1, positions_per_batch // int(seg[i, LENGTH]))
    firsts = np.array(firsts)
    widths = seg[firsts, LENGTH]  # [G]
    rows_per = np.diff(np.append(firsts, n_rows))  # [G]
    sizes = rows_per * widths  # [G] positions per batch
    batch_of_row = np.repeat(np.arange(len(firsts)), rows_per)  # [R]
    row_width = widths[batch_of_row]  # [R]
    row_start = np.cumsum(row_width) - row_width  # [R] first position of each row
    row_of_pos = np.repeat(np.arange(n_rows), row_width)  # [P] positions: batch, row, column
    pos = np.arange(len(row_of_pos))
    col = pos - row_start[row_of_pos]  # [P]
    valid = col < seg[row_of_pos, LENGTH]  # [P]
    idx = (doc_offsets[seg[:, DOC]] + seg[:, START])[row_of_pos] + col  # [P] index in `tokens`
    batch_of_pos = batch_of_row[row_of_pos]  # [P]
    batch_pos = np.cumsum(sizes) - sizes  # [G] first position of each batch
    local = pos - batch_pos[batch_of_pos]  # [P] row * width + column within the batch
    # The buffer holds each batch's [3, b, s] block contiguously: one copy per batch.
    offsets = np.append(0, np.cumsum(3 * sizes))  # [G + 1]
    plane = offsets[:-1][batch_of_pos] + local  # [P] where each position's token id goes
    stride = sizes[batch_of_pos]  # [P] distance to its label, then to its position id
    buf, out = _host_buffer(int(offsets[-1]), pin)
    out[plane] = np.where(valid, tokens[np.where(valid, idx, 0)], 0)
    out[plane + stride] = np.where(valid, tokens[np.where(valid, idx + 1, 0)], 0)
    out[plane + 2 * stride] = np.where(valid, col, 0)
    kept = np.flatnonzero(valid & (col >= seg[row_of_pos, KEEP]))  # [K] in batch order
    cuts = np.cumsum(np.bincount(batch_of_pos[kept], minlength=len(firsts)))[:-1]
    srcs, dests = np.split(local[kept], cuts), np.split(idx[kept] + 1, cuts)
    bounds = offsets.tolist()
    return [
        HostBatch(buf[bounds[g] : bounds[g + 1]].view(3, -1, w), None, srcs[g], dests[g])
        for g, w in enumerate(widths.tolist())
    ]


def packed_row_host_batches(
    table: np.ndarray,
    tokens: np.ndarray,
    doc_offsets: np.ndarray,
    seq_length: int,
    micro_batch_size: int,
    pad_last: bool,
    pin: bool = False,
) -> list[HostBatch]:
    """:func:`pack_rows` + :func:`make_batches` (block-diagonal masks) of the segments ``table``,
    as host batches (arguments as in :func:`length_sorted_host_batches`)."""
    items = [Segment(*map(int, t)) for t in table]
    segs, n_rows = pack_rows(items, seq_length)
    if not n_rows:
        return []
    docs = {s.doc for s in segs}
    doc_tokens = {d: tokens[doc_offsets[d] : doc_offsets[d + 1]] for d in docs}
    out = []
    for b in make_batches(segs, n_rows, doc_tokens, seq_length, micro_batch_size, pad_last):
        data, view = _host_buffer(3 * b.tokens.numel(), pin)
        view.reshape(3, *b.tokens.shape)[:] = np.stack([b.tokens, b.labels, b.position_ids])
        mask = b.attention_mask
        if mask is not None and pin:
            mask = mask.pin_memory()
        src, dest = [], []
        for g in b.segments:
            kept = np.arange(g.keep_from, g.length)
            src.append(g.row * seq_length + g.offset + kept)
            dest.append(doc_offsets[g.doc] + g.start + 1 + kept)
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
        out.append(HostBatch(data.view(3, *b.tokens.shape), mask, cat(src), cat(dest)))
    return out
