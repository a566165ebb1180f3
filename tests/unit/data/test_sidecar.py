"""The sidecar format: value round trip per dtype, order-independent bytes, resume, mismatch
errors that name both the sidecar and the token dataset."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from megatron_slm.data import SidecarError, SidecarReader, SidecarWriter, sidecar_prefix
from tests.unit.data import write_sidecar, write_token_dataset

RNG = np.random.default_rng(0)
DOCS = [list(RNG.integers(0, 1000, size=n)) for n in RNG.integers(1, 60, size=40)]


def _value(doc, pos):
    """A reference loss pattern (NaN at position 0), exactly representable in float16."""
    v = ((doc * 37 + pos * 11) % 512) / 64.0
    return np.where(pos == 0, np.nan, v).astype(np.float32)


@pytest.fixture()
def data(tmp_path):
    return write_token_dataset(str(tmp_path / "corpus"), DOCS)


def _bins(prefix):
    return sidecar_prefix(prefix) + ".bin", sidecar_prefix(prefix) + ".json"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_values(data, dtype):
    noisy = lambda d, p: np.where(p == 0, np.nan, np.sin(d + 0.37 * p) * 5 + 6).astype(np.float32)
    write_sidecar(data, noisy, dtype=dtype, settings={"batch": 8}, reference="ref-v1")
    r = SidecarReader(data)
    assert (r.num_documents, r.num_tokens) == (len(DOCS), sum(map(len, DOCS)))
    assert r.reference == "ref-v1" and r.settings == {"batch": 8} and r.dtype == dtype
    torch_dtype = getattr(torch, dtype)
    for d, doc in enumerate(DOCS):
        exact = noisy(d, np.arange(len(doc)))
        # independent reference: torch's own rounding to the storage dtype
        expected = torch.from_numpy(exact).to(torch_dtype).float().numpy()
        got = r.get(d)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
        assert np.isnan(got[0])
        if len(doc) > 3:
            np.testing.assert_array_equal(r.get(d, 1, 2), expected[1:3])
    with pytest.raises(IndexError):
        r.get(0, 0, len(DOCS[0]) + 1)


def test_bytes_do_not_depend_on_write_order(data, tmp_path):
    write_sidecar(data, _value, dtype="float16", order=lambda s: s)
    first = open(_bins(data)[0], "rb").read(), open(_bins(data)[1]).read()
    rng = np.random.default_rng(1)
    write_sidecar(data, _value, dtype="float16", order=lambda s: list(rng.permutation(s)),
                  overwrite=True, chunk=3)  # fmt: skip
    assert (open(_bins(data)[0], "rb").read(), open(_bins(data)[1]).read()) == first
    assert len(first[0]) == 2 * sum(map(len, DOCS))


def test_resume_produces_same_bytes(data):
    write_sidecar(data, _value)
    reference_bytes = open(_bins(data)[0], "rb").read()
    w = SidecarWriter(data, dtype="float32", reference="test-ref", overwrite=True)
    w.write_range(10, [_value(d, np.arange(len(DOCS[d]))) for d in range(10, 20)])
    w.write_range(30, [_value(d, np.arange(len(DOCS[d]))) for d in range(30, 35)])
    w.close()  # "interrupted"
    with pytest.raises(SidecarError, match="different settings"):
        SidecarWriter.open_or_resume(data, dtype="float32", reference="test-ref",
                                     settings={"x": 1}, overwrite=True)  # fmt: skip
    w = SidecarWriter.open_or_resume(data, dtype="float32", reference="test-ref", overwrite=True)
    assert w.completed_ranges() == [(10, 20), (30, 35)]
    assert w.missing_ranges() == [(0, 10), (20, 30), (35, 40)]
    with pytest.raises(SidecarError, match=r"not written: \[0, 10\)"):
        w.finalize()
    for a, b in w.missing_ranges():
        w.write_range(a, [_value(d, np.arange(len(DOCS[d]))) for d in range(a, b)])
    w.finalize()
    assert open(_bins(data)[0], "rb").read() == reference_bytes
    assert not [f for f in os.listdir(os.path.dirname(data)) if "partial" in f or "ranges" in f]


def test_writer_rejects_wrong_lengths_and_existing(data):
    w = SidecarWriter(data)
    with pytest.raises(ValueError, match="document 1: got"):
        w.write_range(0, [np.zeros(len(DOCS[0])), np.zeros(len(DOCS[1]) + 1)])
    with pytest.raises(IndexError):
        w.write_range(39, [np.zeros(len(DOCS[39])), np.zeros(3)])
    w.close()
    write_sidecar(data, _value)
    with pytest.raises(FileExistsError):
        SidecarWriter(data)


def _assert_names_both(excinfo, data):
    msg = str(excinfo.value)
    assert sidecar_prefix(data) + ".bin" in msg and data + ".idx" in msg and data + ".bin" in msg


def test_mismatch_errors_name_both_files(data, tmp_path):
    write_sidecar(data, _value)
    sc_bin, sc_json = _bins(data)

    # a sidecar of another token dataset (same sizes, different tokens)
    other = write_token_dataset(str(tmp_path / "other"), [[t + 1 for t in d] for d in DOCS])
    for path in _bins(data):
        shutil.copy(path, path.replace(data, other))
    with pytest.raises(SidecarError, match="fingerprint mismatch") as e:
        SidecarReader(other)
    _assert_names_both(e, other)

    # fewer documents: a token dataset with one more document
    more = write_token_dataset(str(tmp_path / "more"), DOCS + [[1, 2, 3]])
    for path in _bins(data):
        shutil.copy(path, path.replace(data, more))
    with pytest.raises(SidecarError, match="40 documents, the token dataset has 41") as e:
        SidecarReader(more)
    _assert_names_both(e, more)

    meta = json.load(open(sc_json))
    for change, pattern in [
        ({"version": 2}, "version 2 is not supported"),
        ({"dtype": "int8"}, "dtype 'int8'"),
        ({"dtype": "float16"}, r"values file has \d+ bytes, expected \d+"),  # fp32 as fp16
        ({"num_tokens": meta["num_tokens"] - 1}, "tokens, the token dataset has"),
    ]:
        json.dump({**meta, **change}, open(sc_json, "w"))
        with pytest.raises(SidecarError, match=pattern) as e:
            SidecarReader(data)
        _assert_names_both(e, data)
    json.dump(meta, open(sc_json, "w"))
    SidecarReader(data)

    # truncated values file
    size = os.path.getsize(sc_bin)
    with open(sc_bin, "r+b") as f:
        f.truncate(size - 4)
    with pytest.raises(SidecarError, match="truncated") as e:
        SidecarReader(data)
    _assert_names_both(e, data)

    os.remove(sc_json)
    with pytest.raises(SidecarError, match="metadata file not found") as e:
        SidecarReader(data)
    _assert_names_both(e, data)


def test_reader_pickles_without_data(data):
    import pickle

    write_sidecar(data, _value)
    r = SidecarReader(data)
    _ = r.get(3)
    clone = pickle.loads(pickle.dumps(r))
    assert len(pickle.dumps(r)) < 4096 + 16 * len(DOCS)
    np.testing.assert_array_equal(clone.get(3), r.get(3))
