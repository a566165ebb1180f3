"""checkpoint.py's own files: RNG states load with weights_only=True (new and old format, the same
draws after restore; a planted pickle is refused unrun); directories are replaced whole (atomic
exchange, and the two-rename fallback); converters refuse a non-empty --save."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from megatron_slm import checkpoint as C
from megatron_slm.errors import CheckpointError, ConfigError


def _draws() -> tuple:
    return (
        random.random(),
        float(np.random.random()),
        float(np.random.randn()),
        float(torch.rand(1)),
    )


def test_rng_state_round_trip_without_pickled_objects(tmp_path):
    np.random.seed(3)
    np.random.randn()  # a cached gaussian is part of the state
    path = str(tmp_path / "rng.pt")
    torch.save(C._rng_state(), path)
    expected = _draws()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    C._set_rng_state(C.load_rng_file(path))
    assert _draws() == expected


def test_old_rng_file_with_numpy_array_loads_under_the_allow_list(tmp_path):
    path = str(tmp_path / "old.pt")
    old = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # pickles an np.ndarray
        "torch": torch.get_rng_state(),
        "cuda": None,
        "tracker": {},
    }
    torch.save(old, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path)  # needs the allow-list
    expected = _draws()
    C._set_rng_state(C.load_rng_file(path))
    assert _draws() == expected


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_planted_pickle_is_refused_and_not_run(tmp_path):
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "rank_00000.pt")
    torch.save({"python": _Marker(marker), "numpy": None, "torch": None, "tracker": {}}, path)
    with pytest.raises(CheckpointError, match="refused") as err:
        C.load_rng_file(path)
    assert str(err.value).startswith(path) and "\n" not in str(err.value)
    assert not os.path.exists(marker)
    # what the loader used to do (weights_only=False) runs it
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


def _tree(root) -> dict[str, str]:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f)).read()
        for d, _, files in os.walk(root)
        for f in files
    }


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_replace_directory(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(C, "_exchange", lambda a, b: False)
    final, new = tmp_path / "iter_1", tmp_path / "iter_1.partial"
    (final / "sub").mkdir(parents=True)
    (final / "sub" / "old").write_text("old")
    (final / "stale").write_text("stale")
    new.mkdir()
    (new / "fresh").write_text("new")
    C.replace_directory(str(new), str(final))
    assert _tree(final) == {"fresh": "new"}
    assert sorted(os.listdir(tmp_path)) == ["iter_1"]
    # no previous directory: a plain rename
    other = tmp_path / "x"
    other.mkdir()
    (other / "f").write_text("1")
    C.replace_directory(str(other), str(tmp_path / "y"))
    assert _tree(tmp_path / "y") == {"f": "1"}


def test_exchange_swaps_on_this_filesystem(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "1").write_text("a")
    if not C._exchange(str(a), str(b)):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    assert os.listdir(b) == ["1"] and os.listdir(a) == []


def test_check_new_output_dir(tmp_path):
    C.check_new_output_dir(str(tmp_path / "missing"), overwrite=False)
    (tmp_path / "empty").mkdir()
    C.check_new_output_dir(str(tmp_path / "empty"), overwrite=False)
    run = tmp_path / "run"
    (run / "iter_0000007").mkdir(parents=True)
    (run / C.TRACKER).write_text("7")
    with pytest.raises(
        ConfigError, match=r"--save .*run holds a checkpoint \(iteration 7\).*--overwrite"
    ):
        C.check_new_output_dir(str(run), overwrite=False)
    C.check_new_output_dir(str(run), overwrite=True)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="export is not empty"):
        C.check_new_output_dir(str(tmp_path / "export"), overwrite=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        C.check_new_output_dir(str(tmp_path / "file"), overwrite=True)


def test_staging_dir_is_fresh_and_published(tmp_path):
    save = tmp_path / "out"
    staged = C.staging_dir(str(save))
    assert os.path.dirname(staged) == str(tmp_path) and os.listdir(staged) == []
    assert staged != C.staging_dir(str(save))  # unique per call
    (tmp_path / "out").mkdir()
    (save / "stale").write_text("x")
    open(os.path.join(staged, "new"), "w").write("y")
    C.publish_output_dir(staged, str(save))
    assert _tree(save) == {"new": "y"}
