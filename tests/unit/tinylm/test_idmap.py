"""The id map file: round trip, validation, and whether it fits a checkpoint."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_slm.checkpoint import CheckpointInfo
from megatron_slm.tinylm.idmap import (
    IdMap,
    IdMapError,
    check_fits_checkpoint,
    idmap_path_for,
    read_idmap,
    write_idmap,
)

OLD = {"type": "SentencePieceTokenizer", "model": "/big.model", "vocab_size": 10, "sha256": "aa"}
NEW = {"type": "SentencePieceTokenizer", "model": "/small.model", "vocab_size": 4, "sha256": "bb"}


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(0, 999), max_size=50))
def test_round_trip(tmp_path_factory, ids):
    path = str(tmp_path_factory.mktemp("m") / "x.idmap.json")
    new_to_old = sorted(ids)
    old = dict(OLD, vocab_size=1000)
    m = IdMap(new_to_old, old, dict(NEW, vocab_size=len(ids)))
    write_idmap(m, path)
    back = read_idmap(path)
    assert back.new_to_old == new_to_old and back.old_tokenizer == old and back.path == path


def _write(tmp_path, **changes):
    obj = IdMap([0, 2, 5, 9], OLD, NEW).to_json()
    obj.update(changes)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"new_to_old": [0, 2, 2, 9]}, "appears twice"),
        ({"new_to_old": [0, 2, 5, 10]}, r"must lie in \[0, 10\)"),
        ({"new_to_old": [0, 2, 5]}, "3 entries, but the new tokenizer has 4 ids"),
        ({"format": "other"}, "not a megatron-slm-idmap file"),
        ({"old_tokenizer": {}}, "malformed"),
    ],
)
def test_invalid_maps(tmp_path, changes, message):
    with pytest.raises(IdMapError, match=message):
        read_idmap(_write(tmp_path, **changes))


def test_missing_and_paths(tmp_path):
    with pytest.raises(IdMapError, match="--id-map .*: no such file"):
        read_idmap(str(tmp_path / "none.json"))
    assert idmap_path_for("out/small.model") == "out/small.idmap.json"


def _ckpt(vocab, sha):
    model = dict(
        num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
        num_query_groups=2, vocab_size=vocab, max_position_embeddings=32,
    )  # fmt: skip
    return CheckpointInfo("/ckpt/iter_0000001", {"model": model, "tokenizer": {"sha256": sha}})


def test_fits_checkpoint(tmp_path):
    m = read_idmap(_write(tmp_path))
    check_fits_checkpoint(m, _ckpt(10, "aa"))
    with pytest.raises(IdMapError, match="maps a 10-id tokenizer, but the checkpoint .* has a voc"):
        check_fits_checkpoint(m, _ckpt(12, "aa"))
    with pytest.raises(IdMapError, match=r"sha256 aa\), but the checkpoint"):
        check_fits_checkpoint(m, _ckpt(10, "cc"))
