"""Writers that used predictable temporary names (``<path>.tmp<pid>``, ``<path>.tmp``) now go
through ``atomic_io`` (mkstemp in the target directory): a symlink planted at the old name is
never written through, the output is complete and no temporary is left."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_slm.data.indexed import DocumentBuilder


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "elsewhere" / "victim"
    path.parent.mkdir()
    path.write_text("keep me")
    return path


def _plant(victim, *names) -> None:
    for name in names:
        os.symlink(victim, name)


def _check(victim, directory, expected: set[str]) -> None:
    assert victim.read_text() == "keep me"
    left = {n for n in os.listdir(directory) if not os.path.islink(os.path.join(directory, n))}
    assert left == expected


def test_prune_write_model(tmp_path, victim):
    from sentencepiece import sentencepiece_model_pb2 as pb

    from megatron_slm.tinylm.prune import write_model

    proto = pb.ModelProto()
    piece = proto.pieces.add()
    piece.piece, piece.score = "▁a", -1.0
    path = str(tmp_path / "small.model")
    _plant(victim, f"{path}.tmp{os.getpid()}")
    write_model(proto, path)
    back = pb.ModelProto()
    back.ParseFromString(open(path, "rb").read())
    assert [p.piece for p in back.pieces] == ["▁a"]
    _check(victim, tmp_path, {"small.model", "elsewhere"})


def test_evaluation_report(tmp_path, victim):
    from megatron_slm.evaluation.report import write_report

    path = str(tmp_path / "report.json")
    _plant(victim, f"{path}.tmp.{os.getpid()}")
    write_report({"results": {"t": {"acc": 0.5}}}, path)
    assert json.load(open(path)) == {"results": {"t": {"acc": 0.5}}}
    _check(victim, tmp_path, {"report.json", "elsewhere"})


def test_token_counts(tmp_path, victim):
    from megatron_slm.tinylm import counts as C

    b = DocumentBuilder(str(tmp_path / "d"), np.uint16)
    b.add_documents(np.array([0, 1, 1, 2]), np.array([4]))
    prefix = b.finalize()
    out = str(tmp_path / "c.npy")
    _plant(victim, f"{out}.tmp{os.getpid()}.npy")
    record = {"type": "SentencePieceTokenizer", "model": "/m", "vocab_size": 4, "sha256": "ab"}
    C.count_corpus([prefix], record, out)
    counts, _ = C.load_counts(out)
    assert counts.tolist() == [1, 2, 1, 0]
    _check(victim, tmp_path, {"c.npy", "c.json", "d.bin", "d.idx", "elsewhere"})


def test_annotation_journal(tmp_path, victim):
    from megatron_slm.refine.annotate_inputs import Journal

    path = str(tmp_path / "answers.jsonl")
    _plant(victim, path + ".tmp")
    journal = Journal(path, {"run": 1})
    journal.f.close()
    assert open(path).read() == '{"run": 1}\n'
    _check(victim, tmp_path, {"answers.jsonl", "elsewhere"})
