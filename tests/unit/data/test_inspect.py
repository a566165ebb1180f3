"""inspect_sidecar / tools/inspect_sidecar.py against statistics computed directly in numpy."""

import json

import numpy as np

from megatron_slm.data import inspect_sidecar, sidecar_prefix
from tests.unit.data import write_sidecar, write_token_dataset

DOCS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [1, 2], [3, 4, 5, 6]]


def _fn(d, p):
    v = (d + 1) * 1.0 + p / 8.0
    v = np.where(p == 0, np.nan, v)
    return np.where((d == 2) & (p == 3), np.nan, v)  # one unscored token inside a document


def test_report_matches_numpy(tmp_path):
    data = write_token_dataset(str(tmp_path / "c"), DOCS, vocab_size=100)
    write_sidecar(data, _fn, dtype="float32", chunk=2)
    allv = np.concatenate([_fn(d, np.arange(len(doc))) for d, doc in enumerate(DOCS)])
    rep = inspect_sidecar(data, top=2, bottom=1)
    assert rep["ok"]
    assert rep["num_tokens"] == 15 and rep["num_documents"] == 5
    assert rep["nan_count"] == int(np.isnan(allv).sum()) == 6
    assert rep["coverage"] == (15 - 6) / (15 - 5)
    np.testing.assert_allclose(rep["mean"], np.nanmean(allv))
    np.testing.assert_allclose(rep["percentiles"][50], np.nanpercentile(allv, 50))
    doc_means = [np.nanmean(_fn(d, np.arange(len(x)))) if len(x) > 1 else np.nan
                 for d, x in enumerate(DOCS)]  # fmt: skip
    assert [d for d, _, _ in rep["top"]] == [4, 3]
    assert rep["bottom"][0][0] == 0
    np.testing.assert_allclose(rep["top"][0][1], doc_means[4])


def test_cli_text_and_failure(tmp_path, capsys):
    from tools.inspect_sidecar import main

    data = write_token_dataset(str(tmp_path / "c"), DOCS, vocab_size=100)
    write_sidecar(data, _fn, dtype="float16")
    argv = ["--data-path", "1.0", data, "--top", "1", "--bottom", "1"]
    argv += ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fingerprint OK" in out and "3 4 5 6" in out and "coverage 90.00%" in out

    meta_path = sidecar_prefix(data) + ".json"
    meta = json.load(open(meta_path))
    meta["token_dataset"]["fingerprint"] = "idx-sha256:0"
    json.dump(meta, open(meta_path, "w"))
    assert main(["--data-path", data]) == 1
    assert "fingerprint mismatch" in capsys.readouterr().out
