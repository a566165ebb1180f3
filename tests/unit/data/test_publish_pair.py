"""indexed.publish_pair / recover_pair in process: the states a killed publication can leave
(built by hand here; tests/functional/test_preprocess_publish.py kills real runs)."""

from __future__ import annotations

import os

import pytest

from megatron_slm.data.indexed import _move_aside, publish_pair, recover_pair
from megatron_slm.errors import InputFileError


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _pair(prefix) -> tuple[bytes | None, bytes | None]:
    out = []
    for ext in (".bin", ".idx"):
        try:
            out.append(open(f"{prefix}{ext}", "rb").read())
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def test_publish_replaces_the_pair_and_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "d")
    publish_pair(prefix, _write(tmp_path / "t1", b"B1"), _write(tmp_path / "t2", b"I1"))
    publish_pair(prefix, _write(tmp_path / "t3", b"B2"), _write(tmp_path / "t4", b"I2"))
    assert _pair(prefix) == (b"B2", b"I2")
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_recover_restores_the_old_pair_set_aside(tmp_path):
    prefix = str(tmp_path / "d")
    _write(prefix + ".bin", b"OLD-B")
    _write(prefix + ".idx", b"OLD-I")
    _move_aside(prefix + ".idx")
    _move_aside(prefix + ".bin")
    _write(prefix + ".bin", b"NEW-B")  # killed before the new .idx came in
    _write(tmp_path / ".d.idx.abc123.tmp", b"NEW-I")  # and its temporary
    assert "restored" in recover_pair(prefix)
    assert _pair(prefix) == (b"OLD-B", b"OLD-I")
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_recover_after_the_commit_keeps_the_new_pair(tmp_path):
    prefix = str(tmp_path / "d")
    _write(prefix + ".bin", b"OLD-B")
    _write(prefix + ".idx", b"OLD-I")
    _move_aside(prefix + ".idx")
    _move_aside(prefix + ".bin")
    _write(prefix + ".bin", b"NEW-B")
    _write(prefix + ".idx", b"NEW-I")
    recover_pair(prefix)
    assert _pair(prefix) == (b"NEW-B", b"NEW-I")
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    assert recover_pair(prefix) is None  # nothing left to do


def test_a_lone_old_index_is_not_kept_to_pair_with_a_new_bin(tmp_path):
    prefix = str(tmp_path / "d")
    _write(prefix + ".idx", b"ORPHAN-I")  # an old .idx whose .bin is gone
    publish_pair(prefix, _write(tmp_path / "t1", b"B"), _write(tmp_path / "t2", b"I"))
    assert _pair(prefix) == (b"B", b"I")
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_several_set_aside_pairs_are_named_not_guessed(tmp_path):
    prefix = str(tmp_path / "d")
    for _ in range(2):
        _write(prefix + ".idx", b"I")
        _move_aside(prefix + ".idx")
    with pytest.raises(InputFileError, match="several set-aside pairs"):
        recover_pair(prefix)
