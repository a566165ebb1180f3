"""Validated reading of megatron-core's indexed dataset index (``<prefix>.idx``) against its
``<prefix>.bin``: the check every reader runs before megatron-core maps the files.

megatron-core's ``_IndexReader`` asserts on the magic bytes and reads the arrays with
``numpy.frombuffer``, so a damaged file surfaces as ``AssertionError`` or a numpy ``ValueError``
without the file's name. :func:`read_index` parses the same layout itself and raises
:class:`InputFileError` naming the file and what is wrong (truncated at byte N, expected M)::

    offset  size           field
    0       9              magic b"MMIDIDX\\x00\\x00"
    9       8  <u8         version (1)
    17      1  <u1         token dtype code (megatron-core's DType)
    18      8  <u8         sequence count S
    26      8  <u8         document count D (boundaries, incl. the leading 0)
    34      4*S <i4        sequence lengths (tokens)
    ...     8*S <i8        sequence pointers (byte offset of each sequence in .bin)
    ...     8*D <i8        document indices (0, ..., S: sequence index where each document starts)

and ``.bin`` holds exactly ``sum(lengths) * itemsize`` bytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from megatron_slm.errors import InputFileError

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34
# megatron-core's DType codes (indexed_dataset.DType); read here so a bad code is our own error.
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CHUNK = 1 << 22  # elements per vectorized check: bounded temporaries on billion-token corpora

__all__ = ["IndexFacts", "check_token_dataset", "num_sequences", "read_index"]


@dataclass(frozen=True)
class IndexFacts:
    """What a validated ``.idx`` says (arrays are copies, not maps of the file)."""

    prefix: str
    dtype: np.dtype
    sequence_lengths: np.ndarray  # [S] int32
    document_indices: np.ndarray  # [D] int64

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def _fail(subject: str, what: str, hint: str | None = None) -> InputFileError:
    return InputFileError(what, subject=subject, hint=hint)


def _size_problem(size: int, expected: int) -> str:
    if size < expected:
        return f"is truncated at byte {size}, expected {expected} bytes"
    return f"has {size} bytes, {size - expected} more than the {expected} expected"


_REBUILD = "re-run tools/preprocess_data.py or copy the dataset again"


def num_sequences(prefix: str) -> int:
    """The sequence count in ``<prefix>.idx``'s header (a file :func:`read_index` validated):
    megatron-core's unit for --split."""
    with open(prefix + ".idx", "rb") as f:
        header = f.read(HEADER_BYTES)
    return struct.unpack("<QBQQ", header[9:])[2]


def read_index(prefix: str, flag: str = "--data-path") -> IndexFacts:
    """Read and validate ``<prefix>.idx`` and the size of ``<prefix>.bin``.

    Raises :class:`InputFileError` (``<flag> <prefix>: <file>: <problem>``) when a file is
    missing, the header is not an index's, the counts do not match the file size, the lengths,
    pointers or document boundaries are inconsistent, or ``.bin`` has another size than the
    index describes."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    subject = f"{flag} {prefix}"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise _fail(
                subject,
                f"{path} not found",
                "give the prefix of a tokenized dataset: PREFIX.bin and PREFIX.idx, as written "
                "by tools/preprocess_data.py",
            )
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        raise _fail(
            subject,
            f"{idx_path} is truncated at byte {idx_size}, the header alone needs {HEADER_BYTES}",
            _REBUILD,
        )
    if header[:9] != MAGIC:
        raise _fail(subject, f"{idx_path} is not a megatron indexed-dataset index (bad magic)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise _fail(subject, f"{idx_path}: index version {version} is not supported (only 1)")
    if code not in DTYPE_CODES:
        raise _fail(subject, f"{idx_path}: unknown token dtype code {code}", _REBUILD)
    dtype = np.dtype(DTYPE_CODES[code])
    expected = HEADER_BYTES + 12 * n_seq + 8 * n_doc
    if idx_size != expected:
        raise _fail(
            subject,
            f"{idx_path} {_size_problem(idx_size, expected)} for {n_seq} sequences and {n_doc} "
            "document boundaries",
            _REBUILD,
        )
    off = HEADER_BYTES
    lengths = np.fromfile(idx_path, dtype="<i4", count=n_seq, offset=off)
    off += 4 * n_seq
    pointers = (
        np.memmap(idx_path, dtype="<i8", mode="r", offset=off, shape=(n_seq,))
        if n_seq
        else np.zeros(0, "<i8")
    )
    off += 8 * n_seq
    docs = np.fromfile(idx_path, dtype="<i8", count=n_doc, offset=off)

    if n_seq and int(lengths.min()) < 0:
        bad = int(np.flatnonzero(lengths < 0)[0])
        raise _fail(subject, f"{idx_path}: sequence {bad} has negative length {lengths[bad]}")
    itemsize = dtype.itemsize
    running = 0  # byte offset where the next sequence must start
    for lo in range(0, n_seq, _CHUNK):
        lens = lengths[lo : lo + _CHUNK].astype(np.int64) * itemsize
        want = running + np.concatenate(([0], np.cumsum(lens[:-1])))
        got = np.asarray(pointers[lo : lo + _CHUNK])
        if not np.array_equal(got, want):
            bad = lo + int(np.flatnonzero(got != want)[0])
            raise _fail(
                subject,
                f"{idx_path}: sequence {bad} starts at byte {int(got[bad - lo])} of {bin_path}, "
                f"the lengths before it put it at byte {int(want[bad - lo])}",
                _REBUILD,
            )
        running += int(lens.sum())
    del pointers
    if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) < 0):
        raise _fail(
            subject,
            f"{idx_path}: document boundaries are not an increasing list from 0 to the "
            f"{n_seq} sequences",
            _REBUILD,
        )
    bin_size = os.path.getsize(bin_path)
    if bin_size != running:
        raise _fail(
            subject,
            f"{bin_path} {_size_problem(bin_size, running)} ({running // itemsize} tokens of "
            f"{dtype.name} listed in {idx_path})",
            "the copy was cut short, or .bin and .idx come from different datasets; " + _REBUILD,
        )
    return IndexFacts(prefix, dtype, lengths, docs)


def check_token_dataset(
    prefix: str, vocab_size: int | None = None, flag: str = "--data-path"
) -> IndexFacts:
    """:func:`read_index`, plus: the token dtype can hold every id of a ``vocab_size`` tokenizer
    (a dataset stored as uint16 cannot come from a 100k-piece tokenizer)."""
    facts = read_index(prefix, flag)
    if facts.dtype.kind not in "iu":
        raise _fail(f"{flag} {prefix}", f"tokens are stored as {facts.dtype.name}, not integers")
    if vocab_size is not None and vocab_size - 1 > np.iinfo(facts.dtype).max:
        raise _fail(
            f"{flag} {prefix}",
            f"tokens are stored as {facts.dtype.name} (ids up to {np.iinfo(facts.dtype).max}), "
            f"but the tokenizer has {vocab_size} ids",
            "the dataset was tokenized with another tokenizer: re-run tools/preprocess_data.py "
            "with this one",
        )
    return facts
