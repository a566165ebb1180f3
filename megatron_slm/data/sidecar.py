"""The reference-loss sidecar: one reference loss per token, next to a token dataset.

Files (for the token dataset ``<P>.bin/.idx`` and ``S = sidecar_prefix(P) = P + "_refloss"``):

- ``S.bin``: the values, raw little-endian, no header, in token order: the values of sequence
  ``d`` (the ``IndexedDataset`` entry ``d``, one per non-empty document with our preprocessing)
  start at element ``sum(sequence_lengths[:d])``. Same layout as the token ``.bin`` so the reader
  is a single memory map.
- ``S.json``: the metadata, written last (its presence publishes the sidecar)::

    {"format": "megatron-slm-refloss", "version": 1, "dtype": "float16",
     "num_documents": N, "num_tokens": T,
     "token_dataset": {"name": "<basename of P>", "fingerprint": "sha256:<idx sha>:bin_bytes=<n>"},
     "reference": "<reference model identity>", "settings": {...scoring settings...}}

Value at position ``i`` of a sequence = reference loss of token ``i`` given the tokens before it;
position 0 has no value and is NaN (the writer stores what it is given: the scorer writes NaN
there). NaN = unscored.

Writing is atomic and resumable. ``SidecarWriter`` preallocates ``S.bin.partial`` (sparse), keeps
its metadata in ``S.json.partial`` and records each completed document range as an empty file
``S.ranges/<first>-<end>`` (one file per range, so several shard processes can write disjoint
ranges of the same partial file concurrently without a shared bookkeeping file). ``finalize``
checks full coverage, renames ``S.bin.partial`` to ``S.bin`` and writes ``S.json``. Every byte is
written from the caller's values, so the result does not depend on the order of the ranges.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from megatron_slm.data.index_file import read_index
from megatron_slm.data.indexed import get_bin_path, get_idx_path, token_dataset_fingerprint
from megatron_slm.errors import InputFileError
from megatron_slm.ranged_output import RangedOutput

FORMAT_NAME = "megatron-slm-refloss"
FORMAT_VERSION = 1
SIDECAR_SUFFIX = "_refloss"
DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4}  # name -> bytes per value

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "SidecarError",
    "SidecarReader",
    "SidecarWriter",
    "sidecar_exists",
    "sidecar_paths",
    "sidecar_prefix",
]


class SidecarError(InputFileError):
    """A sidecar is missing, incomplete or does not belong to its token dataset."""


def sidecar_prefix(data_prefix: str) -> str:
    """``<data_prefix>_refloss``: the sidecar's files are this plus ``.bin`` / ``.json``."""
    return data_prefix + SIDECAR_SUFFIX


def sidecar_paths(data_prefix: str) -> tuple[str, str]:
    """``(values .bin path, metadata .json path)`` of the sidecar of ``data_prefix``."""
    s = sidecar_prefix(data_prefix)
    return s + ".bin", s + ".json"


def sidecar_exists(data_prefix: str) -> bool:
    """Whether a published sidecar (its metadata file) exists for ``data_prefix``."""
    return os.path.isfile(sidecar_paths(data_prefix)[1])


# ---------------------------------------------------------------------------------------------
# value encoding
# ---------------------------------------------------------------------------------------------
def _storage_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"sidecar dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return np.dtype({"float16": "<f2", "bfloat16": "<u2", "float32": "<f4"}[dtype])


def encode_values(values: np.ndarray, dtype: str) -> np.ndarray:
    """float values ``[n]`` -> storage array ``[n]`` (bfloat16: round-to-nearest-even bits)."""
    v = np.asarray(values, dtype=np.float32)
    if dtype == "bfloat16":
        bits = v.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(np.isnan(v), np.uint16(0x7FC0), rounded).astype("<u2")
    return v.astype(_storage_dtype(dtype))


def decode_values(stored: np.ndarray, dtype: str) -> np.ndarray:
    """storage array ``[n]`` -> float32 ``[n]``."""
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# token dataset facts
# ---------------------------------------------------------------------------------------------
def _token_lengths(data_prefix: str) -> np.ndarray:
    """``[n_sequences]`` int32 lengths, read from ``<prefix>.idx`` (validated: a damaged index
    is an ``InputFileError`` naming the file)."""
    return read_index(data_prefix, flag="token dataset").sequence_lengths


def _doc_offsets(lengths: np.ndarray) -> np.ndarray:
    """``[n + 1]`` int64 element offset of each sequence (and the total)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _describe(data_prefix: str) -> str:
    bin_path, json_path = sidecar_paths(data_prefix)
    return (
        f"reference-loss sidecar {bin_path} (metadata {json_path}) for token dataset "
        f"{get_bin_path(data_prefix)} / {get_idx_path(data_prefix)}"
    )


# ---------------------------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------------------------
class SidecarWriter:
    """Write a sidecar document range by document range, then publish it atomically
    (``megatron_slm.ranged_output``: values fsync'd before a range is recorded).

    Args:
        data_prefix: the token dataset prefix ``P`` (``P.bin``/``P.idx`` must exist).
        dtype: value dtype: ``float16`` (default), ``bfloat16`` or ``float32``.
        reference: reference model identity (free text: path, hash, name).
        settings: scoring settings (JSON-serializable dict), recorded verbatim.
        overwrite: replace an already published sidecar (else ``FileExistsError``).

    A fresh writer discards any earlier partial state; use ``open_or_resume`` to continue one.
    """

    def __init__(
        self,
        data_prefix: str,
        *,
        dtype: str = "float16",
        reference: str = "",
        settings: dict | None = None,
        overwrite: bool = False,
        _resume: bool = False,
    ) -> None:
        self.data_prefix = data_prefix
        self.dtype = dtype
        self._np_dtype = _storage_dtype(dtype)
        self.prefix = sidecar_prefix(data_prefix)
        self.bin_path, self.json_path = sidecar_paths(data_prefix)

        lengths = _token_lengths(data_prefix)
        self._offsets = _doc_offsets(lengths)  # [n_docs + 1]
        self.num_documents = len(lengths)
        self.num_tokens = int(self._offsets[-1])
        self.metadata = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dtype": dtype,
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "token_dataset": {
                "name": os.path.basename(data_prefix),
                "fingerprint": token_dataset_fingerprint(data_prefix),
            },
            "reference": str(reference),
            "settings": json.loads(json.dumps(settings or {}, sort_keys=True)),
        }
        if os.path.exists(self.json_path) and not overwrite:
            raise FileExistsError(
                f"{_describe(data_prefix)} is already published; pass overwrite=True to replace it"
            )
        nbytes = self.num_tokens * self._np_dtype.itemsize
        self._out = RangedOutput(self.bin_path, self.json_path, nbytes, self.num_documents)
        self.partial_bin, self.ranges_dir = self._out.partial_bin, self._out.ranges_dir
        if not _resume:
            self._out.create(self.metadata)

    @classmethod
    def open_or_resume(cls, data_prefix: str, **kwargs) -> SidecarWriter:
        """Reopen the partial sidecar of ``data_prefix`` if one exists with the same metadata
        (token dataset fingerprint, dtype, reference, settings: the constructor's keywords),
        keeping its completed ranges; otherwise start a fresh one. A partial sidecar with
        different metadata is an error (delete it, or start fresh with ``SidecarWriter(...)``)."""
        bin_path, json_path = sidecar_paths(data_prefix)
        if not os.path.exists(json_path + ".partial") or not os.path.exists(bin_path + ".partial"):
            return cls(data_prefix, **kwargs)
        writer = cls(data_prefix, _resume=True, **kwargs)
        try:
            found = writer._out.partial_metadata()
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
            raise SidecarError(
                f"the partial sidecar metadata {writer._out.partial_json} is corrupted ({e}); "
                f"delete the partial sidecar or rerun with --overwrite to score from scratch"
            ) from None
        if found != writer.metadata:
            diff = sorted(k for k in writer.metadata if found.get(k) != writer.metadata[k])
            raise SidecarError(
                f"cannot resume {_describe(data_prefix)}: the partial sidecar "
                f"{writer.partial_bin} was started with different {', '.join(diff)} "
                f"(found { ({k: found.get(k) for k in diff}) }); delete it to start over"
            )
        if not writer._out.partial_size_ok():
            expected = writer.num_tokens * writer._np_dtype.itemsize
            raise SidecarError(
                f"cannot resume {_describe(data_prefix)}: {writer.partial_bin} has "
                f"{os.path.getsize(writer.partial_bin)} bytes, expected {expected}"
            )
        os.makedirs(writer.ranges_dir, exist_ok=True)
        return writer

    # -- ranges ----------------------------------------------------------------------------------
    def completed_ranges(self) -> list[tuple[int, int]]:
        """Merged, sorted ``[first, end)`` document ranges written so far (this or earlier runs)."""
        return self._out.completed_ranges()

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Sorted ``[first, end)`` document ranges not yet written."""
        return self._out.missing_ranges()

    def write_range(self, first_doc: int, values: Sequence[np.ndarray]) -> None:
        """Write the values of documents ``first_doc .. first_doc + len(values) - 1``.

        Args:
            first_doc: index of the first document (``IndexedDataset`` sequence) of the range.
            values: one float array per document, ``[len(doc)]`` each (position 0: NaN).

        The data is flushed to disk before the range is recorded as completed, so an interrupted
        job never records a range it did not write.
        """
        end_doc = first_doc + len(values)
        if not 0 <= first_doc <= end_doc <= self.num_documents:
            raise IndexError(
                f"document range [{first_doc}, {end_doc}) outside [0, {self.num_documents}) "
                f"of {get_idx_path(self.data_prefix)}"
            )
        if end_doc == first_doc:
            return
        lengths = np.diff(self._offsets[first_doc : end_doc + 1])
        for i, (v, n) in enumerate(zip(values, lengths)):
            if np.shape(v) != (n,):
                raise ValueError(
                    f"document {first_doc + i}: got {np.shape(v)} values, its length is {n} "
                    f"tokens in {get_idx_path(self.data_prefix)}"
                )
        flat = np.concatenate([np.asarray(v, np.float32) for v in values])  # [n_tokens in range]
        offset = int(self._offsets[first_doc]) * self._np_dtype.itemsize
        self._out.write(first_doc, end_doc, encode_values(flat, self.dtype).tobytes(), offset)

    def copy_documents(self, first_doc: int, source: SidecarReader, chunk_tokens: int = 1 << 24):
        """Copy every document of ``source`` (another dataset's sidecar, of this dtype), stored
        values unchanged, to documents ``first_doc ..``, whose lengths must be the source's;
        in ranges of about ``chunk_tokens`` values (each recorded when written)."""
        n = source.num_documents
        if source.dtype != self.dtype:
            raise SidecarError(
                f"cannot copy {source.bin_path} ({source.dtype}) into a {self.dtype} sidecar"
            )
        mine = np.diff(self._offsets[first_doc : first_doc + n + 1])
        if first_doc + n > self.num_documents or not np.array_equal(mine, np.diff(source._offsets)):
            raise SidecarError(
                f"documents {first_doc}..{first_doc + n - 1} of {get_idx_path(self.data_prefix)}"
                f" are not those of {get_idx_path(source.data_prefix)}"
            )
        itemsize = self._np_dtype.itemsize
        a = 0
        while a < n:
            budget = source._offsets[a] + chunk_tokens
            b = max(a + 1, int(np.searchsorted(source._offsets, budget, side="right")) - 1)
            b = min(b, n)
            lo, hi = int(source._offsets[a]), int(source._offsets[b])
            raw = np.asarray(source.values[lo:hi]).tobytes()
            offset = int(self._offsets[first_doc + a]) * itemsize
            self._out.write(first_doc + a, first_doc + b, raw, offset)
            a = b

    # -- publication -----------------------------------------------------------------------------
    def finalize(self) -> str:
        """Verify every document was written, publish ``S.bin`` + ``S.json`` atomically (the
        metadata last) and remove the partial state. Returns the sidecar prefix."""
        missing = self.missing_ranges()
        if missing:
            shown = ", ".join(f"[{a}, {b})" for a, b in missing[:5])
            raise SidecarError(
                f"cannot finalize {_describe(self.data_prefix)}: documents not written: {shown}"
                + (f" and {len(missing) - 5} more ranges" if len(missing) > 5 else "")
            )
        self._out.publish(self.metadata)
        return self.prefix

    def close(self) -> None:
        """Close the partial file (the partial state stays on disk for a later resume)."""
        self._out.close()


# ---------------------------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------------------------
class SidecarReader:
    """Memory-mapped reader of a published sidecar, verified against its token dataset at open.

    Args:
        data_prefix: the token dataset prefix ``P``.
        sequence_lengths: ``[n_docs]`` lengths if the caller already has them (else read from
            ``P.idx``).

    Raises ``SidecarError`` naming both the sidecar and the token dataset files when the sidecar
    is missing, of another version/format/dtype, truncated, for another number of documents or
    tokens, or for another token dataset (fingerprint).
    """

    def __init__(self, data_prefix: str, sequence_lengths: np.ndarray | None = None) -> None:
        self.data_prefix = data_prefix
        self.bin_path, self.json_path = sidecar_paths(data_prefix)
        self._lengths = sequence_lengths
        self._mmap = None
        self._open()

    def _fail(self, what: str) -> SidecarError:
        return SidecarError(f"{_describe(self.data_prefix)}: {what}")

    def _open(self) -> None:
        if not os.path.isfile(self.json_path):
            partial = (
                " (a partial sidecar exists: scoring did not finish)"
                if os.path.exists(self.bin_path + ".partial")
                else ""
            )
            raise self._fail(f"metadata file not found{partial}")
        if not os.path.isfile(self.bin_path):
            raise self._fail("values file not found")
        try:
            with open(self.json_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
            raise self._fail(f"unreadable metadata ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise self._fail(f"not a {FORMAT_NAME} metadata file")
        if meta.get("version") != FORMAT_VERSION:
            raise self._fail(
                f"format version {meta.get('version')!r} is not supported (this reader reads "
                f"version {FORMAT_VERSION})"
            )
        dtype = meta.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._fail(f"value dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.metadata = meta
        self.dtype = dtype
        self._np_dtype = _storage_dtype(dtype)

        lengths = self._lengths if self._lengths is not None else _token_lengths(self.data_prefix)
        self._offsets = _doc_offsets(np.asarray(lengths))
        n_docs, n_tokens = len(lengths), int(self._offsets[-1])
        if meta.get("num_documents") != n_docs:
            raise self._fail(
                f"sidecar has {meta.get('num_documents')} documents, the token dataset has {n_docs}"
            )
        if meta.get("num_tokens") != n_tokens:
            raise self._fail(
                f"sidecar has {meta.get('num_tokens')} tokens, the token dataset has {n_tokens}"
            )
        expected = n_tokens * self._np_dtype.itemsize
        actual = os.path.getsize(self.bin_path)
        if actual != expected:
            kind = "truncated: " if actual < expected else ""
            raise self._fail(
                f"{kind}values file has {actual} bytes, expected {expected} ({n_tokens} tokens x "
                f"{self._np_dtype.itemsize} bytes of {dtype})"
            )
        token_dataset = meta.get("token_dataset")
        recorded = token_dataset.get("fingerprint") if isinstance(token_dataset, dict) else None
        current = token_dataset_fingerprint(self.data_prefix)
        if recorded != current:
            raise self._fail(
                f"token dataset fingerprint mismatch: the sidecar was computed for {recorded}, "
                f"the token dataset is {current} (was it re-tokenized or replaced?)"
            )
        self.num_documents, self.num_tokens = n_docs, n_tokens
        self.reference = meta.get("reference", "")
        self.settings = meta.get("settings", {})

    @property
    def values(self) -> np.ndarray:
        """All stored values ``[num_tokens]`` (storage dtype, memory-mapped)."""
        if self._mmap is None:
            if self.num_tokens == 0:
                self._mmap = np.zeros(0, dtype=self._np_dtype)
            else:
                self._mmap = np.memmap(self.bin_path, dtype=self._np_dtype, mode="r")
        return self._mmap

    def __len__(self) -> int:
        return self.num_documents

    def document_length(self, doc: int) -> int:
        """Number of tokens (= values) of document ``doc``."""
        return int(self._offsets[doc + 1] - self._offsets[doc])

    def get(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """float32 values ``[length]`` of document ``doc`` from ``offset`` (like
        ``IndexedDataset.get``); NaN where unscored (always at position 0)."""
        start, end = int(self._offsets[doc]), int(self._offsets[doc + 1])
        if length is None:
            length = end - start - offset
        if offset < 0 or length < 0 or start + offset + length > end:
            raise IndexError(
                f"document {doc} of {self.bin_path}: [{offset}, {offset + length}) outside its "
                f"{end - start} tokens"
            )
        lo = start + offset
        return decode_values(np.asarray(self.values[lo : lo + length]), self.dtype)

    def get_flat(self, doc: int, offset: int, length: int) -> np.ndarray:
        """float32 ``[<= length]`` values from element ``offset`` of document ``doc`` on, without
        the document-boundary check (mirrors ``IndexedDataset.get``'s raw read; clipped at the end
        of the file)."""
        lo = int(self._offsets[doc]) + int(offset)
        return decode_values(np.asarray(self.values[lo : lo + int(length)]), self.dtype)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_mmap"] = None  # reopened lazily in the worker, never pickled
        return state
