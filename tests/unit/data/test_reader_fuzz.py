"""Fuzzed file readers: small valid ``.idx``/``.bin``, sidecar (``_refloss.bin``/``.json``) and
checkpoint metadata files, truncated, overwritten, extended and spliced by hypothesis. Every outcome
must be either a correct read (checked against megatron-core's own reader and the sizes) or the
project's own ``UserError`` naming the damaged file; never another exception type, never a hang
(a per-example alarm)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_slm.checkpoint import METADATA, TRACKER, read_checkpoint
from megatron_slm.data.index_file import check_token_dataset, read_index
from megatron_slm.data.sidecar import SidecarReader, sidecar_paths
from megatron_slm.errors import UserError
from megatron_slm.models.presets import get_preset
from tests.unit.data import write_sidecar, write_token_dataset

RNG = np.random.default_rng(7)
DOCS = [list(RNG.integers(0, 500, size=n)) for n in RNG.integers(1, 12, size=6)]
VOCAB = 512  # -> uint16 tokens
FUZZ = settings(
    max_examples=50,
    deadline=None,  # wall time is bounded by the alarm below, not by hypothesis's timing
    derandomize=True,  # CI runs the same examples every time
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
ALARM_S = 10


@contextlib.contextmanager
def no_hang(seconds: int = ALARM_S):
    def _raise(*_):
        raise TimeoutError(f"reader did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def pristine():
    """A valid token dataset with a float16 sidecar and a checkpoint metadata directory."""
    root = tempfile.mkdtemp(prefix="fuzz-readers-")
    prefix = write_token_dataset(os.path.join(root, "corpus"), DOCS, vocab_size=VOCAB)
    write_sidecar(prefix, lambda d, p: np.where(p == 0, np.nan, (d + p) / 8.0), dtype="float16")
    ckpt = os.path.join(root, "ckpt")
    os.makedirs(os.path.join(ckpt, "iter_0000003"))
    meta = {
        "format_version": 1,
        "iteration": 3,
        "model": dataclasses.asdict(get_preset("tiny").replace(vocab_size=VOCAB)),
        "padded_vocab_size": VOCAB,
        "seq_length": 64,
        "params_dtype": "float32",
        "tokenizer": {"type": "NullTokenizer", "vocab_size": VOCAB},
        "config": {"training": {"seq_length": 64}},
    }
    with open(os.path.join(ckpt, "iter_0000003", METADATA), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(ckpt, TRACKER), "w") as f:
        f.write("3")
    yield root, os.path.basename(prefix)
    shutil.rmtree(root)


# One mutation: (kind, position fraction, payload). Positions are fractions of the file size so
# every mutation lands inside whichever file it targets.
MUTATION = st.tuples(
    st.sampled_from(["truncate", "overwrite", "insert", "append", "zero"]),
    st.floats(0.0, 1.0),
    st.binary(min_size=1, max_size=9),
)


def _mutate(path: str, mutations) -> None:
    data = bytearray(open(path, "rb").read())
    for kind, where, payload in mutations:
        pos = min(int(where * len(data)), len(data))
        if kind == "truncate":
            del data[pos:]
        elif kind == "overwrite":
            data[pos : pos + len(payload)] = payload
        elif kind == "insert":
            data[pos:pos] = payload
        elif kind == "append":
            data += payload
        else:
            data[pos : pos + 8] = bytes(len(data[pos : pos + 8]))
    with open(path, "wb") as f:
        f.write(bytes(data))


def _copy(pristine, tmp: str) -> str:
    root, name = pristine
    for entry in os.listdir(root):
        src = os.path.join(root, entry)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(tmp, entry))
    return os.path.join(tmp, name)


def _expect_clear_error(exc: UserError, *names: str) -> None:
    text = str(exc)
    assert "\n" not in text.strip(), text
    assert any(n in text for n in names), f"the error does not name the file: {text}"


def _check_index_read(prefix: str) -> None:
    """A correct read: megatron-core's reader opens what read_index accepted, and agrees."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    facts = check_token_dataset(prefix, VOCAB)
    ds = IndexedDataset(prefix)
    np.testing.assert_array_equal(np.asarray(ds.sequence_lengths), facts.sequence_lengths)
    np.testing.assert_array_equal(np.asarray(ds.document_indices), facts.document_indices)
    for i in range(len(ds)):
        assert len(ds[i]) == facts.sequence_lengths[i]
    assert os.path.getsize(prefix + ".bin") == facts.num_tokens * facts.dtype.itemsize


def _check_sidecar_read(prefix: str) -> None:
    reader = SidecarReader(prefix)
    lengths = read_index(prefix).sequence_lengths
    assert len(reader) == len(lengths)
    for d, n in enumerate(lengths):
        assert reader.get(d).shape == (n,)


def _check_checkpoint_read(ckpt: str) -> None:
    info = read_checkpoint(ckpt)
    assert info.model.vocab_size > 0
    info.seq_length, info.tokenizer, info.vocab_divisor, info.params_dtype  # noqa: B018


TARGETS = {
    "idx": (lambda p: p + ".idx", _check_index_read),
    "bin": (lambda p: p + ".bin", _check_index_read),
    "sidecar-bin": (lambda p: sidecar_paths(p)[0], _check_sidecar_read),
    "sidecar-json": (lambda p: sidecar_paths(p)[1], _check_sidecar_read),
    "sidecar-of-idx": (lambda p: p + ".idx", _check_sidecar_read),
    "checkpoint-json": (
        lambda p: os.path.join(os.path.dirname(p), "ckpt", "iter_0000003", METADATA),
        lambda p: _check_checkpoint_read(os.path.join(os.path.dirname(p), "ckpt")),
    ),
    "checkpoint-tracker": (
        lambda p: os.path.join(os.path.dirname(p), "ckpt", TRACKER),
        lambda p: _check_checkpoint_read(os.path.join(os.path.dirname(p), "ckpt")),
    ),
}


def test_pristine_files_read(pristine, tmp_path):
    prefix = _copy(pristine, str(tmp_path))
    for _, check in TARGETS.values():
        check(prefix)


@pytest.mark.parametrize("target", sorted(TARGETS))
@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_damaged_file_is_read_or_named(pristine, target, mutations):
    path_of, check = TARGETS[target]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = _copy(pristine, tmp)
        path = path_of(prefix)
        _mutate(path, mutations)
        with no_hang():
            try:
                check(prefix)
            except UserError as exc:
                _expect_clear_error(exc, path, os.path.basename(path), prefix)
