"""Atomic writes: content and mode of the result, no symlink followed, temporaries recognised
exactly."""

import os
import stat

import pytest

from megatron_slm import atomic_io
from megatron_slm.atomic_io import is_temp_of, temp_files_of, write_bytes_atomic, write_json_atomic


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(str(path), {"b": 1, "a": [2]})
    assert path.read_text() == '{\n "a": [\n  2\n ],\n "b": 1\n}'
    write_bytes_atomic(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["out.json"]  # no temporary left
    # the mode a plain open() gives: 0666 minus the umask (mkstemp alone would give 0600)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_symlink_at_the_old_temp_name_is_not_followed(tmp_path):
    """The writer used ``<path>.tmp<pid>`` with open("wb"): a link planted there was truncated
    and written through."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    path = tmp_path / "out.json"
    os.symlink(target, f"{path}.tmp{os.getpid()}")
    write_bytes_atomic(str(path), b"data")
    assert target.read_text() == "keep me"
    assert path.read_bytes() == b"data" and not os.path.islink(path)


def test_symlink_at_the_output_is_replaced_not_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    path = tmp_path / "out.json"
    os.symlink(target, path)
    write_bytes_atomic(str(path), b"data")
    assert target.read_text() == "keep me"
    assert path.read_bytes() == b"data" and not os.path.islink(path)


def test_a_failed_write_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    path.write_bytes(b"old")

    def boom(*_):
        raise OSError(5, "disk on fire")

    monkeypatch.setattr(atomic_io.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_bytes_atomic(str(path), b"new")
    assert sorted(os.listdir(tmp_path)) == ["out.json"] and path.read_bytes() == b"old"


def test_temp_names_are_recognised_exactly(tmp_path, monkeypatch):
    path = str(tmp_path / "a.jsonl")
    made = []
    real_replace = os.replace

    def spy(src, dst):  # record the name the writer really used
        made.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(atomic_io.os, "replace", spy)
    write_bytes_atomic(path, b"x")
    assert is_temp_of(path, made[0])
    for other in [
        "a.jsonl",
        "a.jsonl.partial",
        "a.jsonl.tmp7",  # the old name
        "a.jsonl.tmp7.jsonl",  # another shard's output
        ".a.jsonl.tmp7.jsonl.abc.tmp",  # shard a.jsonl.tmp7's own temporary
        ".a.jsonl..tmp",
        ".b.jsonl.abcd1234.tmp",
    ]:
        assert not is_temp_of(path, str(tmp_path / other)), other
    assert not is_temp_of(path, str(tmp_path / "sub" / ".a.jsonl.abcd1234.tmp"))
    stale = tmp_path / ".a.jsonl.abcd1234.tmp"
    stale.write_text("")
    (tmp_path / "a.jsonl.tmp7.jsonl").write_text("")
    assert temp_files_of(path) == [str(stale)]
