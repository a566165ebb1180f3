"""Publishing a token dataset pair: a preprocessing run SIGKILLed at each step of the publication
leaves the old pair, the new pair, or no index (refused by every reader) with the old pair put
back by the next run; never an old ``.idx`` beside a new ``.bin``. And one writer per output."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_slm.data import preprocess_corpus
from megatron_slm.data.index_file import read_index
from megatron_slm.data.indexed import KILL_HOOK_ENV, recover_pair
from megatron_slm.errors import InputFileError
from megatron_slm.output_lock import OutputLock, OutputLockedError
from tests import zygote
from tests.unit.data import write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 100


def _corpus(path, seed: int) -> str:
    """Ten documents of the same lengths whatever the seed: the old and the new pair have .bin
    files of one size, so a mismatched pair would pass every size check."""
    rng = np.random.default_rng(seed)
    recs = [{"text": " ".join(map(str, rng.integers(0, VOCAB - 1, 5 + i)))} for i in range(10)]
    return write_jsonl(str(path), recs)


def _preprocess(src: str, out: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", src]
    cmd += ["--output-prefix", out, "--tokenizer-type", "NullTokenizer"]
    cmd += ["--vocab-size", str(VOCAB), "--workers", "1", "--log-interval", "0"]
    full_env = {k: v for k, v in os.environ.items() if k != KILL_HOOK_ENV}
    full_env.update(env or {})
    return zygote.run(cmd, env=full_env, capture_output=True, text=True, timeout=120)


def _pair(prefix: str) -> tuple[bytes, bytes] | None:
    try:
        with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
            return b.read(), i.read()
    except FileNotFoundError:
        return None


def _documents(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The bytes and documents of the old (seed 0) and the new (seed 1) dataset."""
    root = tmp_path_factory.mktemp("pairs")
    out = {}
    for name, seed in (("old", 0), ("new", 1)):
        src = _corpus(root / f"{name}.jsonl", seed)
        preprocess_corpus([src], str(root / name), "NullTokenizer", vocab_size=VOCAB)
        prefix = str(root / f"{name}_text_document")
        out[name] = (src, _pair(prefix), _documents(prefix))
    assert os.path.getsize(root / "old_text_document.bin") == os.path.getsize(
        root / "new_text_document.bin"
    )
    assert out["old"][2] != out["new"][2]
    return out


@pytest.mark.parametrize("point", ["idx-aside", "bin-aside", "bin", "idx"])
def test_sigkill_at_each_step_never_leaves_a_mismatched_pair(pairs, tmp_path, point):
    old_src, old_bytes, old_docs = pairs["old"]
    new_src, new_bytes, new_docs = pairs["new"]
    out = str(tmp_path / "d")
    prefix = out + "_text_document"
    preprocess_corpus([old_src], out, "NullTokenizer", vocab_size=VOCAB)
    assert _pair(prefix) == old_bytes

    killed = _preprocess(new_src, out, {KILL_HOOK_ENV: f"{point}:1"})
    assert killed.returncode == -9, killed.stderr

    state = _pair(prefix)
    if os.path.exists(prefix + ".idx"):
        # a loadable index: the complete old or the complete new pair, as every reader sees it
        read_index(prefix)
        assert state in (old_bytes, new_bytes), point
        assert _documents(prefix) in (old_docs, new_docs)
    else:
        # no index: refused by our validator and by megatron-core's reader alike
        with pytest.raises(InputFileError):
            read_index(prefix)
        with pytest.raises((FileNotFoundError, AssertionError), match="cannot be found"):
            IndexedDataset(prefix)
    expected_now = new_bytes if point == "idx" else old_bytes
    if point == "idx":
        assert state == new_bytes

    # the next writer repairs first: the old pair is back (or the new one kept), nothing stale
    recover_pair(prefix)
    assert _pair(prefix) == expected_now
    assert sorted(os.listdir(tmp_path)) == ["d.lock", "d_text_document.bin", "d_text_document.idx"]

    # killed again, then a full run (which repairs first): the new pair, nothing left over
    assert _preprocess(new_src, out, {KILL_HOOK_ENV: f"{point}:1"}).returncode == -9
    preprocess_corpus([new_src], out, "NullTokenizer", vocab_size=VOCAB)
    assert _pair(prefix) == new_bytes
    assert sorted(os.listdir(tmp_path)) == ["d.lock", "d_text_document.bin", "d_text_document.idx"]


def test_temporaries_have_unique_names_and_no_planted_file_is_written(pairs, tmp_path):
    """The writer used ``<prefix>.bin.tmp``: a symlink planted there was written through."""
    src = pairs["new"][0]
    victim = tmp_path / "victim"
    victim.write_text("keep")
    for ext in (".bin.tmp", ".idx.tmp"):
        os.symlink(victim, tmp_path / f"d_text_document{ext}")
    preprocess_corpus([src], str(tmp_path / "d"), "NullTokenizer", vocab_size=VOCAB)
    assert victim.read_text() == "keep"
    assert _pair(str(tmp_path / "d_text_document")) == pairs["new"][1]


def test_a_second_writer_is_refused(pairs, tmp_path):
    src = pairs["new"][0]
    out = str(tmp_path / "d")
    with OutputLock(out + ".lock", "the test"):
        proc = _preprocess(src, out)
    assert proc.returncode == 2
    assert "being written by another job" in proc.stderr.strip().splitlines()[-1]
    assert not os.path.exists(out + "_text_document.bin")
    with OutputLock(out + ".lock", "the test"), pytest.raises(OutputLockedError):
        preprocess_corpus([src], out, "NullTokenizer", vocab_size=VOCAB)
