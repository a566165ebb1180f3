"""Multiple-round training data (RethinkTinyLM): the trainer's sample order, per-sample losses of
that order, and batch lists drawn from it.

Three pieces, shared by ``tools/score_batches.py``, ``tools/resample_batches.py`` and the trainer
(``--train-samples-from``):

* **Source** (:func:`source_settings`, :func:`build_source_dataset`): the training sample order is
  megatron-core's ``GPTDataset`` order for the blend, split, seed, sequence length and number of
  train samples, built by the trainer's own ``build_gpt_datasets``. Batch ``b`` is samples
  ``b * G .. (b + 1) * G - 1`` (``G`` = global batch size), as the trainer draws them. The source
  record holds every setting that decides that order plus each dataset's fingerprint
  (``data.indexed.token_dataset_fingerprint``): files made for one order are refused for another.
* **Batch losses** ``<P>.bin`` + ``<P>.json``: one ``(loss, tokens)`` record per sample (mean loss
  over its loss-masked tokens as float32, token count as int32), resumable like the sidecar: a
  preallocated ``<P>.bin.partial``, metadata in ``<P>.json.partial``, one empty marker file per
  written sample range in ``<P>.ranges/``; ``finalize`` renames and writes ``<P>.json`` last.
  A batch's loss is the token-weighted mean of its samples (the trainer's per-token normalisation).
* **Batch list** (a JSON file, e.g. ``round2.idx``): the chosen batch ids of the source, in
  training order, with the source record and the draw's settings and report.
  :class:`SampleListDataset` exposes its samples to the trainer as one dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_slm.atomic_io import file_sha256, write_json_atomic
from megatron_slm.errors import InputFileError
from megatron_slm.ranged_output import RangedOutput

LOSSES_FORMAT = "megatron-slm-batch-losses"
LIST_FORMAT = "megatron-slm-batch-list"
VERSION = 1
RECORD = np.dtype([("loss", "<f4"), ("tokens", "<i4")])  # one per sample

# Settings that decide the sample order, in the order mismatches are reported.
SOURCE_KEYS = (
    "datasets",
    "weights",
    "split",
    "seq_length",
    "seed",
    "num_samples",
    "global_batch_size",
)


class SampleListError(InputFileError):
    """A batch-losses file or batch list that does not fit (names the file and the setting)."""


# -- source --------------------------------------------------------------------------------------


def source_settings(
    data_path: Sequence[str],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: int | None,
    global_batch_size: int,
) -> dict:
    """The record of a training sample order (its size: :func:`build_source_dataset`)."""
    from megatron_slm.data.gpt_dataset import parse_data_path
    from megatron_slm.data.indexed import token_dataset_fingerprint

    prefixes, weights = parse_data_path(list(data_path))
    return {
        "datasets": [
            {"name": os.path.basename(p), "fingerprint": token_dataset_fingerprint(p)}
            for p in prefixes
        ],
        "weights": None if weights is None else [float(w) for w in weights],
        "split": split,
        "seq_length": int(seq_length),
        "seed": int(seed),
        "num_samples": None if num_samples is None else int(num_samples),
        "global_batch_size": int(global_batch_size),
    }


def build_source_dataset(
    data_path: Sequence[str],
    source: dict,
    tokenizer,
    data_cache_path: str | None = None,
    eod_mask_loss: bool = False,
):
    """The train dataset of ``source`` (what the trainer builds for it; ``eod_mask_loss``: its
    --eod-mask-loss, which changes the loss masks, not the order) and its number of whole
    batches: ``min(num_samples or len, len) // global_batch_size``."""
    from megatron_slm.data.gpt_dataset import build_gpt_datasets

    train, _, _ = build_gpt_datasets(
        list(data_path),
        source["split"],
        source["seq_length"],
        source["seed"],
        [source["num_samples"], 0, 0],
        tokenizer,
        data_cache_path=data_cache_path,
        eod_mask_loss=eod_mask_loss,
    )
    if train is None:
        raise SampleListError(f"--split {source['split']}: the train split is empty")
    n = len(train) if source["num_samples"] is None else min(len(train), source["num_samples"])
    return train, n // source["global_batch_size"]


def check_source(found: dict, expected: dict, what: str, flags: str) -> None:
    """Raise SampleListError naming the first setting where ``found`` (a file's record) differs
    from ``expected`` (the current flags')."""
    for key in SOURCE_KEYS:
        a, b = found.get(key), expected.get(key)
        if key == "datasets":
            a = [d.get("fingerprint") for d in a or []]
            b = [d.get("fingerprint") for d in b or []]
            if a != b:
                raise SampleListError(
                    f"{what} was made for other data (dataset fingerprints differ from {flags}'s "
                    f"--data-path: the token files changed or another blend is given)"
                )
        elif a != b:
            flag = "--" + key.replace("_", "-")
            raise SampleListError(f"{what} was made with {flag} {a}, the run has {flag} {b}")


# -- batch losses --------------------------------------------------------------------------------


def losses_paths(prefix: str) -> tuple[str, str]:
    """``--losses`` / ``--output`` given as ``P`` or ``P.json`` -> (``P.bin``, ``P.json``)."""
    prefix = prefix.removesuffix(".json")
    return prefix + ".bin", prefix + ".json"


class BatchLossesWriter:
    """Rank 0's resumable writer of a batch-losses file (see the module docstring), sample range
    by sample range (``megatron_slm.ranged_output``)."""

    def __init__(self, prefix: str, meta: dict, n_samples: int, overwrite: bool = False):
        self.bin_path, self.json_path = losses_paths(prefix)
        self.meta = dict(meta, format=LOSSES_FORMAT, version=VERSION, samples=n_samples)
        self.n = n_samples
        if os.path.exists(self.json_path) and not overwrite:
            raise SampleListError(
                f"--output {self.json_path} already exists; pass --overwrite to replace it"
            )
        self._out = RangedOutput(
            self.bin_path, self.json_path, n_samples * RECORD.itemsize, n_samples
        )
        self.partial_bin, self.partial_json = self._out.partial_bin, self._out.partial_json
        if self._out.partial_exists() and not overwrite:
            try:
                old = self._out.partial_metadata()
            except (OSError, ValueError) as e:
                raise SampleListError(f"--output {self.partial_json} is unreadable ({e})") from None
            if old != json.loads(json.dumps(self.meta)):
                raise SampleListError(
                    f"--output {self.json_path}: a partial run with other settings exists "
                    f"({self.partial_json}); rerun with its flags or pass --overwrite"
                )
            if not self._out.partial_size_ok():
                raise SampleListError(f"--output {self.partial_bin} has the wrong size")
            os.makedirs(self._out.ranges_dir, exist_ok=True)
            return
        self._out.create(self.meta)

    def completed_ranges(self) -> list[tuple[int, int]]:
        return self._out.completed_ranges()

    def write_range(self, first: int, records: np.ndarray) -> None:
        """Write samples ``first ..`` (data fsync'd before the range is recorded)."""
        records = np.ascontiguousarray(records, dtype=RECORD)
        end = first + len(records)
        self._out.write(first, end, records.tobytes(), first * RECORD.itemsize)

    def finalize(self) -> None:
        missing = self._out.missing_ranges()
        if missing:
            raise SampleListError(
                f"{self.partial_bin}: samples {missing[0][0]}.. were never written"
            )
        self._out.publish(self.meta)


@dataclass
class BatchLosses:
    meta: dict
    records: np.ndarray  # [samples] RECORD
    path: str

    @property
    def source(self) -> dict:
        return self.meta["source"]

    @property
    def sample_losses(self) -> np.ndarray:
        return self.records["loss"]

    def batch_losses(self) -> np.ndarray:
        """``[batches]`` float64: token-weighted mean loss of each batch."""
        g = self.source["global_batch_size"]
        loss = self.records["loss"].astype(np.float64).reshape(-1, g)
        tokens = self.records["tokens"].astype(np.float64).reshape(-1, g)
        return (loss * tokens).sum(1) / np.maximum(tokens.sum(1), 1.0)


def read_batch_losses(prefix: str, flag: str = "--losses") -> BatchLosses:
    bin_path, json_path = losses_paths(prefix)
    if not os.path.exists(json_path):
        partial = os.path.exists(json_path + ".partial")
        raise SampleListError(
            f"{flag} {json_path} does not exist"
            + (
                " (only a partial run: rerun tools/score_batches.py to finish it)"
                if partial
                else ""
            )
        )
    try:
        with open(json_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SampleListError(f"{flag} {json_path}: unreadable ({e})") from None
    if meta.get("format") != LOSSES_FORMAT or meta.get("version") != VERSION:
        raise SampleListError(f"{flag} {json_path} is not a {LOSSES_FORMAT} v{VERSION} file")
    n = int(meta["samples"])
    if not os.path.exists(bin_path) or os.path.getsize(bin_path) != n * RECORD.itemsize:
        raise SampleListError(f"{flag} {bin_path} is missing or not {n} records long")
    records = np.fromfile(bin_path, dtype=RECORD)
    return BatchLosses(meta, records, json_path)


# -- batch lists ---------------------------------------------------------------------------------


@dataclass
class BatchList:
    meta: dict
    batches: list[int]
    path: str
    sha256: str

    @property
    def source(self) -> dict:
        return self.meta["source"]


def write_batch_list(path: str, source: dict, batches: Sequence[int], **extra) -> None:
    ids = check_batch_ids(batches, source, f"--output {path}")
    meta = {"format": LIST_FORMAT, "version": VERSION, "source": source, **extra}
    meta["batches"] = ids
    write_json_atomic(path, meta)


def check_batch_ids(batches, source, where: str) -> list[int]:
    """``batches`` as ints, each a batch of ``source`` (``0 <= id < source["batches"]``), or
    SampleListError naming ``where``, the first offending id and the valid range. A list is only
    usable against the count its source record holds: the trainer checks every id with it at plan
    time (before any step or write) and that count against the dataset it builds."""
    n = source.get("batches") if isinstance(source, dict) else None
    if not _is_int(n) or n < 0:
        raise SampleListError(
            f"{where}: the source record has no batch count ('source.batches'); "
            "draw the list with tools/resample_batches.py"
        )
    if not isinstance(batches, list | tuple | np.ndarray):
        raise SampleListError(f"{where}: 'batches' is not a list of batch ids")
    ids = []
    for pos, b in enumerate(batches):
        if not _is_int(b):
            raise SampleListError(f"{where}: batch id {b!r} (entry {pos}) is not an integer")
        if not 0 <= b < n:
            raise SampleListError(
                f"{where}: batch id {int(b)} (entry {pos}) is outside the source order, whose "
                f"{n} batches have ids 0..{n - 1}"
            )
        ids.append(int(b))
    return ids


def _is_int(x) -> bool:
    # JSON true/false parse as bool, a subclass of int; 3.0 is a float: neither is a batch id.
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def read_batch_list(path: str, flag: str = "--train-samples-from") -> BatchList:
    """Read a batch list and check every id against its source's batch count (SampleListError
    naming ``flag``, the file, the id and the valid range)."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise SampleListError(f"{flag} {path} does not exist") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleListError(f"{flag} {path}: not a batch list ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != LIST_FORMAT:
        raise SampleListError(f"{flag} {path}: not a {LIST_FORMAT} file")
    if meta.get("version") != VERSION:
        raise SampleListError(f"{flag} {path}: version {meta.get('version')}, expected {VERSION}")
    if "batches" not in meta:
        raise SampleListError(f"{flag} {path}: no 'batches' list")
    batches = check_batch_ids(meta.pop("batches"), meta.get("source"), f"{flag} {path}")
    return BatchList(meta, batches, path, file_sha256(path))


class SampleListDataset:
    """The samples of ``batches`` of ``source`` in order: item ``i`` is source sample
    ``batches[i // G] * G + i % G``. The trainer's consumed-sample count indexes it as any
    dataset, so a resume continues inside the round exactly."""

    def __init__(self, source, batches: Sequence[int], global_batch_size: int):
        self.source = source
        self.batches = np.asarray(batches, dtype=np.int64)
        self.g = global_batch_size

    def __len__(self) -> int:
        return len(self.batches) * self.g

    def source_index(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return int(self.batches[i // self.g]) * self.g + i % self.g

    def __getitem__(self, i: int):
        return self.source[self.source_index(i)]
