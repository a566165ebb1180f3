"""Helpers around megatron-core's ``IndexedDataset`` (``<prefix>.bin`` + ``<prefix>.idx``).

- ``DocumentBuilder``: megatron-core's ``IndexedDatasetBuilder`` with a batched
  ``add_documents`` (one ``write`` per batch instead of one torch tensor per document) and atomic
  publication (written to ``*.tmp`` names, renamed in ``finalize``).
- ``token_dataset_fingerprint``: what a sidecar records to prove it belongs to a token dataset.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

__all__ = [
    "DocumentBuilder",
    "IndexedDataset",
    "get_bin_path",
    "get_idx_path",
    "optimal_token_dtype",
    "token_dataset_fingerprint",
]

TMP_SUFFIX = ".tmp"


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

    Files are written to ``<prefix>.bin.tmp`` / ``<prefix>.idx.tmp`` and renamed by ``finalize``.
    """

    def __init__(self, path_prefix: str, dtype: type) -> None:
        self.path_prefix = path_prefix
        super().__init__(get_bin_path(path_prefix) + TMP_SUFFIX, dtype=dtype)

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
        """Write the index, then atomically rename both files; returns the prefix."""
        idx_tmp = get_idx_path(self.path_prefix) + TMP_SUFFIX
        super().finalize(idx_tmp)
        os.replace(get_bin_path(self.path_prefix) + TMP_SUFFIX, get_bin_path(self.path_prefix))
        os.replace(idx_tmp, get_idx_path(self.path_prefix))
        return self.path_prefix

    def abort(self) -> None:
        """Close and delete the temporary files."""
        if not self.data_file.closed:
            self.data_file.close()
        for path in (get_bin_path(self.path_prefix), get_idx_path(self.path_prefix)):
            if os.path.exists(path + TMP_SUFFIX):
                os.remove(path + TMP_SUFFIX)


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
