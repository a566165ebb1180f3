"""preprocess_corpus / tools/preprocess_data.py: round trip through megatron-core's
IndexedDataset, worker-count invariance, malformed lines, atomic outputs."""

import filecmp
import glob
import os
import random

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_slm.data import preprocess_corpus, train_sentencepiece
from tests.unit.data import write_jsonl

WORDS = ["hello", "world", "naïve", "café", "日本語", "中文", "😀", "🚀", "data", "the", "a", "∑x²"]


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        k = rng.choice([0, 1, 5, 40, 200])
        text = " ".join(rng.choice(WORDS) for _ in range(k))
        if i % 17 == 3:
            text = ""  # empty document
        recs.append({"text": text, "title": f"doc {i} {rng.choice(WORDS)}", "id": i})
    recs[7]["text"] = " ".join(rng.choice(WORDS) for _ in range(30000))  # very long document
    recs[8]["text"] = "line one\nline two\ttab \u2028 sep \x00 nul"
    return recs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    recs = _records(1300)
    # split over two files, matched by a glob, to check file order is kept
    write_jsonl(str(d / "part-0.jsonl"), recs[:700])
    write_jsonl(str(d / "part-1.jsonl"), recs[700:])
    sample = [r["text"] for r in recs[:200] if r["text"]][:60]
    model = train_sentencepiece(sample, str(d / "sp"), vocab_size=500)
    return d, recs, model


def _run(d, model, out, workers, **kw):
    return preprocess_corpus(
        [str(d / "part-*.jsonl")],
        str(out),
        "SentencePieceTokenizer",
        tokenizer_model=model,
        workers=workers,
        log_interval=0,
        **kw,
    )


def test_round_trip_and_worker_invariance(corpus, tmp_path):
    import sentencepiece as spm

    d, recs, model = corpus
    sp = spm.SentencePieceProcessor(model_file=model)
    r1 = _run(d, model, tmp_path / "w1", 1, append_eod=True, json_keys=("text", "title"))
    r2 = _run(d, model, tmp_path / "w2", 2, append_eod=True, json_keys=("text", "title"))
    assert set(r1) == {"text", "title"}
    for key in ("text", "title"):
        for ext in (".bin", ".idx"):
            assert filecmp.cmp(r1[key] + ext, r2[key] + ext, shallow=False), (key, ext)
    # nothing but the published pairs and their locks (temporaries are hidden dotfiles)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert all(n.endswith((".bin", ".idx", ".lock")) and not n.startswith(".") for n in left), left
    assert r1.num_documents == len(recs)

    for key in ("text", "title"):
        expected = [sp.encode(r[key]) for r in recs]
        ds = IndexedDataset(r1[key])
        # megatron-core sees one sequence per non-empty document, in order, + EOD
        nonempty = [e + [sp.eos_id()] for e in expected if e]
        assert len(ds) == len(nonempty)
        for i, ids in enumerate(nonempty):
            np.testing.assert_array_equal(ds[i], np.array(ids, dtype=ds[i].dtype))
        # document boundaries: empty documents add a boundary but no sequence
        ends = np.cumsum([1 if e else 0 for e in expected])
        np.testing.assert_array_equal(ds.document_indices, np.concatenate([[0], ends]))
        assert ds.index.dtype == np.uint16
    text_ds = IndexedDataset(r1["text"])  # keep a reference: its views die with its mmap
    long_ids = text_ds[7 - sum(1 for r in recs[:7] if not r["text"])]
    assert len(long_ids) > 30000
    assert sp.decode(long_ids[:-1].tolist()) == recs[7]["text"]


def test_without_eod_matches_sentencepiece(corpus, tmp_path):
    import sentencepiece as spm

    d, recs, model = corpus
    sp = spm.SentencePieceProcessor(model_file=model)
    out = _run(d, model, tmp_path / "noeod", 1)["text"]
    ds = IndexedDataset(out)
    expected = [sp.encode(r["text"]) for r in recs if r["text"]]
    assert [ds[i].tolist() for i in range(len(ds))] == expected


def test_llama2_tokenizer_documents_lead_with_bos(corpus, tmp_path):
    """Megatron-LM's preprocessing with --tokenizer-type Llama2Tokenizer: each document is
    [bos] + its ids + [eod], an empty text too (its tokenization is not empty)."""
    import sentencepiece as spm

    d, recs, model = corpus
    sp = spm.SentencePieceProcessor(model_file=model)
    out = preprocess_corpus(
        [str(d / "part-0.jsonl")], str(tmp_path / "llama2"), "Llama2Tokenizer",
        tokenizer_model=model, append_eod=True, log_interval=0,
    )["text"]  # fmt: skip
    ds = IndexedDataset(out)
    expected = [[sp.bos_id(), *sp.encode(r["text"]), sp.eos_id()] for r in recs[:700]]
    assert len(ds) == 700 and [ds[i].tolist() for i in (0, 3, 7, 8)] == [
        expected[i] for i in (0, 3, 7, 8)
    ]
    assert recs[3]["text"] == "" and expected[3] == [sp.bos_id(), sp.eos_id()]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    recs = [{"text": f"{i} {i + 1}"} for i in range(20)]
    bad = write_jsonl(
        str(tmp_path / "bad.jsonl"),
        recs,
        raw_lines={5: '{"text": "unterminated', 9: '["not", "an", "object"]', 12: '{"other": 1}'},
    )
    for workers in (1, 2):
        with pytest.raises(ValueError, match=r"bad\.jsonl:5: malformed JSONL"):
            preprocess_corpus(
                [bad], str(tmp_path / "o"), "NullTokenizer", vocab_size=64, workers=workers
            )
        assert not glob.glob(str(tmp_path / "o_*"))  # nothing published, temporaries removed
    res = preprocess_corpus(
        [bad], str(tmp_path / "o"), "NullTokenizer", vocab_size=64, skip_bad_lines=True
    )
    assert res.skipped_lines == 3
    ds = IndexedDataset(res["text"])
    kept = [r for i, r in enumerate(recs, start=1) if i not in (5, 9, 12)]
    assert [ds[i].tolist() for i in range(len(ds))] == [
        [int(x) for x in r["text"].split()] for r in kept
    ]
    # a non-string value and a missing key are reported with their line too
    bad2 = write_jsonl(str(tmp_path / "bad2.jsonl"), [{"text": "1"}, {"text": 5}])
    with pytest.raises(ValueError, match=r"bad2\.jsonl:2: .*not a string"):
        preprocess_corpus([bad2], str(tmp_path / "p"), "NullTokenizer", vocab_size=64)
    bad3 = write_jsonl(str(tmp_path / "bad3.jsonl"), [{"text": "1"}, {"txt": "1"}])
    with pytest.raises(ValueError, match=r"bad3\.jsonl:2: .*missing key 'text'"):
        preprocess_corpus([bad3], str(tmp_path / "p"), "NullTokenizer", vocab_size=64)


def test_cli(tmp_path, capsys):
    from tools.preprocess_data import main

    src = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": "1 2 3"}, {"text": "4"}], {2: "{"})
    rc = main(
        [
            "--input", src, "--output-prefix", str(tmp_path / "cli"),
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "10",
            "--append-eod", "--workers", "2", "--skip-bad-lines", "--log-interval", "1",
            # Megatron-LM's partition flags: one pool here, documents in input order
            "--partitions", "2", "--keep-sequential-samples",
        ]
    )  # fmt: skip
    assert rc == 0
    assert "skipped 1 malformed lines" in capsys.readouterr().out
    ds = IndexedDataset(str(tmp_path / "cli_text_document"))
    assert ds[0].tolist() == [1, 2, 3, 10]  # EOD = --vocab-size, as Megatron-LM appends it
    assert os.path.exists(str(tmp_path / "cli_text_document.idx"))
    argv = ["--input", src, "--output-prefix", str(tmp_path / "bad"), "--tokenizer-type",
            "NullTokenizer", "--vocab-size", "10", "--workers", "3",
            "--partitions", "2"]  # fmt: skip
    assert main(argv) == 2
    assert "--partitions 2 must be >= 1 and divide --workers 3" in capsys.readouterr().err


def test_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        preprocess_corpus([str(tmp_path / "*.jsonl")], str(tmp_path / "o"), "NullTokenizer", 8)
