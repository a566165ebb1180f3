"""Counting ids over indexed datasets: equal to a plain bincount of the documents, at any number of
workers and work-unit size; blends weighted like sampling; counts tied to their tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_slm.data.indexed import DocumentBuilder
from megatron_slm.tinylm import counts as C


def _dataset(path, docs, dtype=np.uint16) -> str:
    b = DocumentBuilder(str(path), dtype)
    b.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    return b.finalize()


def _random_docs(seed, vocab, n_docs=200):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(0, 300)) for _ in range(n_docs)]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("range_tokens", [1 << 25, 1000, 7])
def test_count_equals_bincount(tmp_path, monkeypatch, workers, range_tokens):
    monkeypatch.setattr(C, "RANGE_TOKENS", range_tokens)
    monkeypatch.setattr(C, "BLOCK_TOKENS", 333)  # several blocks per range
    docs = _random_docs(0, 5000)
    prefix = _dataset(tmp_path / "d", docs)
    tr = C.token_ranges(prefix, range_tokens)
    # Work units cover the file exactly, in order, and start at document starts.
    assert tr.ranges[0][0] == 0 and tr.ranges[-1][1] == sum(map(len, docs))
    assert all(a[1] == b[0] for a, b in zip(tr.ranges, tr.ranges[1:]))
    starts = set(np.cumsum([0] + [len(d) for d in docs]).tolist())
    assert all(a in starts for a, _ in tr.ranges)
    got = C.count_ids(prefix, 5000, workers=workers)
    want = np.bincount(np.concatenate(docs), minlength=5000)
    assert got.dtype == np.int64 and np.array_equal(got, want)


def test_int32_dataset_and_foreign_ids(tmp_path):
    docs = _random_docs(1, 70000, 20)
    prefix = _dataset(tmp_path / "big", docs, np.int32)
    assert np.array_equal(
        C.count_ids(prefix, 70000), np.bincount(np.concatenate(docs), minlength=70000)
    )
    top = int(np.concatenate(docs).max())
    with pytest.raises(C.CountsError, match=rf"holds id {top}, but the tokenizer has only 1000"):
        C.count_ids(prefix, 1000)


def test_blend_and_metadata(tmp_path):
    a = _dataset(tmp_path / "a", [np.array([0, 1, 1, 2])])
    b = _dataset(tmp_path / "b", [np.array([3, 3]), np.array([3, 4, 4, 4])])
    record = {"type": "SentencePieceTokenizer", "model": "/m", "vocab_size": 6, "sha256": "ab"}
    out = str(tmp_path / "c.npy")
    meta = C.count_corpus([a, b], record, out)
    counts, loaded = C.load_counts(out)
    assert counts.tolist() == [1, 2, 1, 3, 3, 0] and loaded == json.loads(json.dumps(meta))
    assert loaded["tokenizer"] == record and loaded["num_tokens"] == 10 and not loaded["weighted"]
    assert [d["num_tokens"] for d in loaded["datasets"]] == [4, 6]
    # Weighted 3:1 -> each dataset's frequencies times its share, scaled to 10 tokens.
    C.count_corpus(["3", a, "1", b], record, out)
    counts, loaded = C.load_counts(out)
    fa, fb = np.array([1, 2, 1, 0, 0, 0]) / 4, np.array([0, 0, 0, 3, 3, 0]) / 6
    assert loaded["weighted"] and np.allclose(counts, (0.75 * fa + 0.25 * fb) * 10)


def test_bad_inputs(tmp_path):
    with pytest.raises(C.CountsError, match="not found"):
        C.token_ranges(str(tmp_path / "missing"))
    with pytest.raises(C.CountsError, match="WEIGHT PREFIX pairs"):
        C.parse_blend(["1", "a", "2"])
    with pytest.raises(C.CountsError, match="no such file"):
        C.load_counts(str(tmp_path / "none.npy"))
    np.save(tmp_path / "bare.npy", np.zeros(3))
    with pytest.raises(C.CountsError, match="the tokenizer that made them is unknown"):
        C.load_counts(str(tmp_path / "bare.npy"))


def test_counts_from_another_tokenizer():
    meta = {"tokenizer": {"model": "/other.model", "sha256": "1111"}}
    with pytest.raises(C.CountsError, match="the counts have 5 ids, the tokenizer big.model has 6"):
        C.check_counts_tokenizer(np.zeros(5), meta, 6, "2222", "big.model", "--counts")
    with pytest.raises(C.CountsError, match=r"counted with tokenizer /other.model \(sha256 1111\)"):
        C.check_counts_tokenizer(np.zeros(6), meta, 6, "2222", "big.model", "--counts")
    C.check_counts_tokenizer(np.zeros(6), meta, 6, "1111", "big.model", "--counts")
