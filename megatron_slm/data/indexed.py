"""Helpers around megatron-core's ``IndexedDataset`` (``<prefix>.bin`` + ``<prefix>.idx``).

- ``DocumentBuilder``: megatron-core's ``IndexedDatasetBuilder`` with a batched
  ``add_documents`` (one ``write`` per batch instead of one torch tensor per document) and a
  crash-safe publication of the pair (:func:`publish_pair`, :func:`recover_pair`).
- ``token_dataset_fingerprint``: what a sidecar records to prove it belongs to a token dataset.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from functools import lru_cache

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_slm.atomic_io import current_umask, fsync_dir, temp_files_of
from megatron_slm.crash_points import CrashPoints
from megatron_slm.errors import InputFileError

__all__ = [
    "DocumentBuilder",
    "IndexedDataset",
    "get_bin_path",
    "get_idx_path",
    "optimal_token_dtype",
    "token_dataset_fingerprint",
]

# Tests SIGKILL a publication at a named point (crash_points.py): "idx-aside" (the old .idx moved
# aside), "bin-aside" (the old .bin too), "bin" (new .bin in place), "idx" (new .idx in place,
# the old pair not yet deleted).
KILL_HOOK_ENV = "MEGATRON_SLM_PREPROCESS_KILL_AT"
_crash = CrashPoints(KILL_HOOK_ENV)
_ASIDE_SUFFIX = ".old"


def blend_prefixes(data_path: list[str]) -> list[str]:
    """Megatron's ``--data-path [WEIGHT] PREFIX ...`` without the weights."""
    return [p for p in data_path if not _is_number(p)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def optimal_token_dtype(vocab_size: int) -> type:
    """Token dtype Megatron-LM's preprocess_data picks: uint16 below 65500 ids, else int32."""
    return DType.optimal_dtype(vocab_size)


class DocumentBuilder(IndexedDatasetBuilder):
    """Write an ``IndexedDataset`` with one sequence per non-empty document, like Megatron-LM's
    ``preprocess_data.py`` without sentence splitting (an empty document adds a document boundary
    but no sequence).

    Both files are written under unique temporary names (``.<name>.<random>.tmp``, made by
    ``mkstemp`` in the target directory) and published by ``finalize`` (:func:`publish_pair`).
    """

    def __init__(self, path_prefix: str, dtype: type) -> None:
        self.path_prefix = path_prefix
        bin_path = get_bin_path(path_prefix)
        fd, self._bin_tmp = _mkstemp_next_to(bin_path, ".tmp")
        # The parent opens its own file by name; ours is the O_EXCL one mkstemp created.
        super().__init__(os.devnull, dtype=dtype)
        self.data_file.close()
        self.data_file = os.fdopen(fd, "wb")
        self._idx_tmp: str | None = None

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append a batch of documents.

        Args:
            tokens: ``[sum(lengths)]`` the documents' ids, concatenated.
            lengths: ``[n_docs]`` ids per document (0 for an empty document).
        """
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        assert tokens.size == int(lengths.sum()), (tokens.size, int(lengths.sum()))
        self.data_file.write(tokens.tobytes(order="C"))
        nonempty = lengths[lengths > 0]
        start = len(self.sequence_lengths)
        self.sequence_lengths.extend(nonempty.tolist())
        # document i ends after the sequences of documents <= i
        ends = start + np.cumsum(lengths > 0)
        self.document_indices.extend(ends.tolist())

    def finalize(self) -> str:  # type: ignore[override]
        """Write the index, make both files durable, publish the pair; returns the prefix."""
        self.data_file.flush()
        os.fsync(self.data_file.fileno())
        fd, self._idx_tmp = _mkstemp_next_to(get_idx_path(self.path_prefix), ".tmp")
        os.close(fd)
        super().finalize(self._idx_tmp)  # closes the .bin, writes the .idx (megatron-core's format)
        _fsync_file(self._idx_tmp)
        publish_pair(self.path_prefix, self._bin_tmp, self._idx_tmp)
        return self.path_prefix

    def abort(self) -> None:
        """Close and delete the temporary files."""
        if not self.data_file.closed:
            self.data_file.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if path is not None and os.path.exists(path):
                os.remove(path)


def _mkstemp_next_to(path: str, suffix: str) -> tuple[int, str]:
    """A new file ``.<name>.<random><suffix>`` beside ``path`` (``O_EXCL``: never a planted one)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=directory)
    os.fchmod(
        fd, 0o666 & ~current_umask()
    )  # mkstemp makes 0600; the dataset gets open()'s usual mode
    return fd, tmp


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_aside(path: str) -> str:
    """Rename ``path`` to a fresh ``.<name>.<random>.old`` beside it; returns the new name."""
    fd, aside = _mkstemp_next_to(path, _ASIDE_SUFFIX)
    os.close(fd)
    os.replace(path, aside)  # over the empty file we just created
    return aside


def _asides_of(path: str) -> list[str]:
    directory = os.path.dirname(os.path.abspath(path))
    pattern = re.escape(f".{os.path.basename(path)}.") + r"[^./]+" + re.escape(_ASIDE_SUFFIX)
    return sorted(
        os.path.join(directory, n) for n in os.listdir(directory) if re.fullmatch(pattern, n)
    )


def publish_pair(path_prefix: str, bin_tmp: str, idx_tmp: str) -> None:
    """Publish complete ``bin_tmp``/``idx_tmp`` as ``<prefix>.bin``/``.idx``.

    Two names cannot change in one atomic step, so the order makes every intermediate state
    unloadable instead of mismatched: the old ``.idx`` leaves first (moved aside, with the old
    ``.bin`` after it), the new ``.bin`` comes in, and the new ``.idx`` comes in last. Between
    the first and the last rename there is no ``.idx``: every reader (ours and megatron-core's)
    refuses, none pairs an old index with a new ``.bin``; the old pair waits aside, and
    :func:`recover_pair` (run by the next writer before anything else) puts it back. After the
    last rename the new pair is complete and the old one is deleted. The caller holds the
    output lock."""
    bin_path, idx_path = get_bin_path(path_prefix), get_idx_path(path_prefix)
    directory = os.path.dirname(os.path.abspath(bin_path))
    fsync_dir(directory)  # the temporaries' names are durable before the old pair moves
    asides = []
    if os.path.lexists(idx_path) and not os.path.lexists(bin_path):
        os.remove(idx_path)  # an index without its .bin loads nothing; restoring it could pair it
    if os.path.lexists(idx_path):
        asides.append(_move_aside(idx_path))
        _crash.reached("idx-aside")  # the old .bin is still in place: recovery restores the .idx
        asides.append(_move_aside(bin_path))
        _crash.reached("bin-aside")
    os.replace(bin_tmp, bin_path)
    _crash.reached("bin")
    os.replace(idx_tmp, idx_path)  # the commit point
    fsync_dir(directory)
    _crash.reached("idx")
    for aside in asides:
        os.remove(aside)


def recover_pair(path_prefix: str) -> str | None:
    """Finish what a killed :func:`publish_pair` (or builder) left for ``path_prefix``: with no
    ``.idx`` but an old pair aside, put the old pair back; with the ``.idx`` in place, delete what
    was aside; delete stale temporaries either way. Returns what was done (for the log), or None.
    The caller holds the output lock."""
    bin_path, idx_path = get_bin_path(path_prefix), get_idx_path(path_prefix)
    done = []
    for stale in temp_files_of(bin_path) + temp_files_of(idx_path):
        os.remove(stale)
        done.append(f"removed {stale}")
    idx_asides, bin_asides = _asides_of(idx_path), _asides_of(bin_path)
    if len(idx_asides) > 1 or len(bin_asides) > 1:
        raise InputFileError(
            f"{path_prefix}: several set-aside pairs ({', '.join(idx_asides + bin_asides)}); "
            "keep the one you want as <prefix>.bin/.idx and delete the others"
        )
    if os.path.lexists(idx_path) or not idx_asides:
        for aside in idx_asides + bin_asides:
            os.remove(aside)
            done.append(f"removed {aside}")
    else:  # killed between its first and last rename: the old pair goes back, .idx last
        if bin_asides:
            os.replace(bin_asides[0], bin_path)
        os.replace(idx_asides[0], idx_path)
        fsync_dir(os.path.dirname(os.path.abspath(idx_path)))
        done.append(f"restored the previous {path_prefix}.bin/.idx")
    return "; ".join(done) or None


# The fingerprint hashes the .bin only at _FP_BLOCKS evenly spaced blocks of _FP_BLOCK_BYTES (the
# whole file when smaller): 256 KiB of reads per open whatever the corpus size, while any global
# change of content (re-tokenization, reordering) changes it; the .idx is hashed in full.
_FP_BLOCKS = 64
_FP_BLOCK_BYTES = 4096


@lru_cache(maxsize=64)
def _fingerprint_cached(
    idx_path: str, bin_path: str, idx_stat: tuple[int, int], bin_stat: tuple[int, int]
) -> str:
    h = hashlib.sha256()
    with open(idx_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    bin_size = bin_stat[0]
    b = hashlib.sha256()
    with open(bin_path, "rb") as f:
        if bin_size <= _FP_BLOCKS * _FP_BLOCK_BYTES:
            b.update(f.read())
        else:
            for off in np.linspace(0, bin_size - _FP_BLOCK_BYTES, _FP_BLOCKS).astype(np.int64):
                f.seek(int(off))
                b.update(f.read(_FP_BLOCK_BYTES))
    return f"idx-sha256:{h.hexdigest()}:bin-sample-sha256:{b.hexdigest()[:32]}:bin-bytes:{bin_size}"


def token_dataset_fingerprint(path_prefix: str) -> str:
    """Fingerprint of a token dataset: ``sha256`` of ``<prefix>.idx`` (lengths, pointers, document
    boundaries, dtype), ``sha256`` of 64 evenly spaced 4 KiB blocks of ``<prefix>.bin`` (all of
    it when small) and the size of ``<prefix>.bin``. Cached per file version (size, mtime)."""
    idx_path, bin_path = get_idx_path(path_prefix), get_bin_path(path_prefix)
    si, sb = os.stat(idx_path), os.stat(bin_path)
    return _fingerprint_cached(
        os.path.abspath(idx_path),
        os.path.abspath(bin_path),
        (si.st_size, si.st_mtime_ns),
        (sb.st_size, sb.st_mtime_ns),
    )
