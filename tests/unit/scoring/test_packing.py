"""Packing and sliding windows: every token scored exactly once, enough context, block-diagonal
causal masks, deterministic rows, and scatter back to per-document values."""

import numpy as np
import pytest
import torch

from megatron_slm.scoring.packing import (
    document_segments,
    length_sorted_batches,
    length_sorted_host_batches,
    make_batches,
    pack_rows,
    packed_row_host_batches,
    plan_windows,
    scatter_losses,
    segment_table,
)


@pytest.mark.parametrize("seq,stride", [(8, 8), (8, 3), (8, 1), (16, 5)])
def test_windows_cover_each_token_once_with_context(seq, stride):
    for n in range(0, 60):
        covered = np.zeros(n, dtype=int)
        for start, length, keep in plan_windows(n, seq, stride):
            assert length <= seq and start + length <= n - 1
            if n - 1 > seq and start + length < n - 1:
                assert length == seq  # only the last window may be shorter
            for j in range(keep, length):
                pos = start + 1 + j
                covered[pos] += 1
                # context of position pos in this window: inputs start .. pos - 1
                assert pos - start >= min(pos, seq - stride)
        assert covered[:1].sum() == 0 and (covered[1:] == 1).all(), (n, covered)


def test_bad_stride():
    with pytest.raises(ValueError, match="--stride"):
        plan_windows(10, 8, 9)


def test_pack_rows_first_fit_decreasing_is_deterministic():
    lengths = [5, 9, 2, 30, 9, 1, 17]
    docs = list(range(10, 17))
    segs, rows = pack_rows(document_segments(docs, lengths, 16, 8), 16)
    again, rows2 = pack_rows(document_segments(docs, lengths, 16, 8), 16)
    assert segs == again and rows == rows2
    used = np.zeros((rows, 16), dtype=int)
    for s in segs:
        used[s.row, s.offset : s.offset + s.length] += 1
    assert used.max() == 1  # no overlap
    assert sum(s.length for s in segs) == used.sum()
    # 30 tokens (29 predictions) -> windows 0..15, 8..23 (2 full rows) and 16..28 (13); 17 tokens
    # -> one full row; the rest (13 + 4 + 8 + 1 + 8 = 34 predictions) needs 3 rows: 6 in all
    assert rows == 6
    assert {s.doc for s in segs} == set(docs) - {15}  # a 1-token document has nothing to score


def test_make_batches_mask_and_scatter():
    docs = [0, 1, 2]
    toks = {0: np.arange(5), 1: np.arange(100, 104), 2: np.arange(200, 220)}
    segs, rows = pack_rows(document_segments(docs, [5, 4, 20], 8, 4), 8)
    batches = make_batches(segs, rows, toks, 8, 2)
    assert all(b.tokens.shape == (2, 8) for b in batches)
    assert sum(b.num_real_rows for b in batches) == rows
    for b in batches:
        if b.attention_mask is None:
            continue
        mask = b.attention_mask.dense()  # [b, 1, s, s], True = masked
        assert mask.shape == (2, 1, 8, 8)
        assert not mask[:, 0].diagonal(dim1=-2, dim2=-1).any()  # every query sees itself
        for seg in b.segments:
            lo, hi = seg.offset, seg.offset + seg.length
            block = mask[seg.row, 0, lo:hi, lo:hi]
            assert torch.equal(block, ~torch.tril(torch.ones(seg.length, seg.length, dtype=bool)))
            assert mask[seg.row, 0, lo:hi, :lo].all() and mask[seg.row, 0, lo:hi, hi:].all()
            ids = toks[seg.doc]
            assert (
                b.tokens[seg.row, lo:hi].tolist()
                == ids[seg.start : seg.start + seg.length].tolist()
            )
            assert (
                b.labels[seg.row, lo:hi].tolist()
                == ids[seg.start + 1 : seg.start + seg.length + 1].tolist()
            )
            # from 0 in every segment, windows included (a learned position table's rows)
            assert b.position_ids[seg.row, lo:hi].tolist() == list(range(seg.length))
    # loss = label id: scatter must put each label's id at its document position
    values = {d: np.full(len(t), np.nan, dtype=np.float32) for d, t in toks.items()}
    for b in batches:
        scatter_losses(b, b.labels.numpy().astype(np.float32), values)
    for d, t in toks.items():
        assert np.isnan(values[d][0])
        np.testing.assert_array_equal(values[d][1:], t[1:])


def test_length_sorted_batches_one_segment_per_row_no_mask():
    rng = np.random.default_rng(3)
    toks = {d: rng.integers(0, 500, size=n) for d, n in enumerate([1, 2, 5, 9, 9, 30, 3, 17, 8])}
    items = document_segments(list(toks), [len(t) for t in toks.values()], 16, 8)
    batches = length_sorted_batches(items, toks, 32)
    assert sum(len(b.segments) for b in batches) == len(items)
    widths = [b.tokens.shape[1] for b in batches]
    assert widths == sorted(widths, reverse=True)
    for b in batches:
        assert b.attention_mask is None
        assert b.tokens.numel() <= 32 or len(b.segments) == 1  # budget, unless one long segment
        assert b.tokens.shape[1] == max(s.length for s in b.segments)
        for s in b.segments:
            assert s.offset == 0
            ids = toks[s.doc]
            assert (
                b.tokens[s.row, : s.length].tolist() == ids[s.start : s.start + s.length].tolist()
            )
    values = {d: np.full(len(t), np.nan, dtype=np.float32) for d, t in toks.items()}
    for b in batches:
        scatter_losses(b, b.labels.numpy().astype(np.float32), values)
    for d, t in toks.items():
        assert np.isnan(values[d][0])
        np.testing.assert_array_equal(values[d][1:], t[1:])


def test_checkpoint_seq_length_from_trainer_metadata():
    from megatron_slm.checkpoint import CheckpointInfo
    from megatron_slm.scoring.inputs import default_stride

    def seq(meta):
        return CheckpointInfo("ckpt", meta).seq_length

    assert seq({"config": {"training": {"seq_length": 128}}}) == 128
    assert seq({"seq_length": 64}) == 64
    assert seq({"model": {}}) is None
    assert default_stride(128) == 96 and default_stride(1) == 1


# --- the scorer's vectorised host batches against the per-segment reference above --------------
def _corpus(seed: int, n_docs: int, seq: int):
    """Random documents (some empty, of one token, or several windows long), back to back."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 3 * seq, size=n_docs)
    lengths[:3] = [0, 1, 2]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(0, 500, size=int(offsets[-1])).astype(np.int64)
    docs = {d: tokens[offsets[d] : offsets[d + 1]] for d in range(n_docs)}
    return lengths, offsets, tokens, docs


def _reference_values(batches, docs, offsets, losses):
    values = {d: np.full(len(t), np.nan, dtype=np.float32) for d, t in docs.items()}
    for b, loss in zip(batches, losses):
        scatter_losses(b, loss, values)
    return np.concatenate([values[d] for d in range(len(docs))])


def _host_values(batches, offsets, losses):
    values = np.full(int(offsets[-1]), np.nan, dtype=np.float32)
    for b, loss in zip(batches, losses):
        b.scatter(loss, values)
    return values


@pytest.mark.parametrize("seq,stride", [(16, 12), (16, 5), (8, 8)])
def test_segment_table_is_document_segments(seq, stride):
    lengths, *_ = _corpus(1, 40, seq)
    ref = document_segments(list(range(len(lengths))), lengths, seq, stride)
    table = segment_table(lengths, seq, stride)
    assert table.tolist() == [[s.doc, s.start, s.length, s.keep_from] for s in ref]


@pytest.mark.parametrize("budget", [16, 37, 64])
def test_length_sorted_host_batches_equal_reference(budget):
    seq, stride = 16, 12
    lengths, offsets, tokens, docs = _corpus(2, 60, seq)
    ref = length_sorted_batches(document_segments(list(docs), lengths, seq, stride), docs, budget)
    host = length_sorted_host_batches(segment_table(lengths, seq, stride), tokens, offsets, budget)
    assert len(host) == len(ref)
    rng = np.random.default_rng(0)
    for h, r in zip(host, ref):
        assert h.attention_mask is None
        torch.testing.assert_close(h.data, torch.stack([r.tokens, r.labels, r.position_ids]))
    losses = [rng.random(tuple(r.tokens.shape), dtype=np.float32) for r in ref]
    expected = _reference_values(ref, docs, offsets, losses)
    np.testing.assert_array_equal(_host_values(host, offsets, losses), expected)
    assert np.isnan(expected).sum() == (lengths > 0).sum()  # only each document's first token


@pytest.mark.parametrize("pad_last", [True, False])
def test_packed_row_host_batches_equal_reference(pad_last):
    seq, stride, mbs = 16, 5, 3
    lengths, offsets, tokens, docs = _corpus(3, 30, seq)
    segs, rows = pack_rows(document_segments(list(docs), lengths, seq, stride), seq)
    ref = make_batches(segs, rows, docs, seq, mbs, pad_last=pad_last)
    table = segment_table(lengths, seq, stride)
    host = packed_row_host_batches(table, tokens, offsets, seq, mbs, pad_last)
    assert len(host) == len(ref) and any(r.attention_mask is not None for r in ref)
    for h, r in zip(host, ref):
        torch.testing.assert_close(h.data, torch.stack([r.tokens, r.labels, r.position_ids]))
        if r.attention_mask is None:
            assert h.attention_mask is None
        else:
            assert torch.equal(h.attention_mask.doc_ids, r.attention_mask.doc_ids)
    rng = np.random.default_rng(1)
    losses = [rng.random(tuple(r.tokens.shape), dtype=np.float32) for r in ref]
    expected = _reference_values(ref, docs, offsets, losses)
    np.testing.assert_array_equal(_host_values(host, offsets, losses), expected)


def test_model_dtype_is_the_checkpoints_unless_fp32():
    import dataclasses

    from megatron_slm.checkpoint import CheckpointInfo
    from megatron_slm.models import get_preset
    from megatron_slm.scoring import ScoreConfig
    from megatron_slm.scoring.inputs import ScoringInputs, model_dtype

    arch = get_preset("tiny")
    meta = {"model": dataclasses.asdict(arch), "padded_vocab_size": 512}
    bf16 = CheckpointInfo("ckpt", dict(meta, params_dtype="bfloat16"))
    config = ScoreConfig(data_prefix=["d"], load="ckpt")
    assert model_dtype(config, bf16) == torch.bfloat16
    assert model_dtype(config, CheckpointInfo("ckpt", meta)) == torch.float32  # none recorded
    forced = ScoreConfig(data_prefix=["d"], load="ckpt", fp32=True)
    assert model_dtype(forced, bf16) == torch.float32
    # the dtype is a recorded setting: a resume in another dtype is refused
    for cfg, dtype in ((config, torch.bfloat16), (forced, torch.float32)):
        inputs = ScoringInputs(bf16, arch, None, 512, 64, 48, "ref", model_dtype(cfg, bf16))
        assert inputs.settings(cfg)["params_dtype"] == str(dtype).removeprefix("torch.")
