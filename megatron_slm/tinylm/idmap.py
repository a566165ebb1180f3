"""The id map of a pruned tokenizer: ``small.idmap.json``, new id -> old id.

``{"format": "megatron-slm-idmap", "version": 1, "new_to_old": [...], "old_tokenizer": {...},
"new_tokenizer": {...}}``; the tokenizer records are ``checkpoint.tokenizer_record``'s (type,
absolute model path, vocabulary size, sha256 of the model file), so ``remap-checkpoint`` can check
that a checkpoint was trained with the old tokenizer and record the new one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from megatron_slm.atomic_io import write_json_atomic
from megatron_slm.errors import InputFileError

IDMAP_FORMAT = "megatron-slm-idmap"
IDMAP_VERSION = 1


class IdMapError(InputFileError):
    """An id map that cannot be read or does not fit (names the flag and the file)."""


def idmap_path_for(model_path: str) -> str:
    """``small.model`` -> ``small.idmap.json``."""
    base = model_path[:-6] if model_path.endswith(".model") else model_path
    return base + ".idmap.json"


@dataclass(frozen=True)
class IdMap:
    new_to_old: list[int]
    old_tokenizer: dict
    new_tokenizer: dict
    path: str = ""

    @property
    def new_size(self) -> int:
        return len(self.new_to_old)

    @property
    def old_size(self) -> int:
        return int(self.old_tokenizer["vocab_size"])

    def to_json(self) -> dict:
        return {
            "format": IDMAP_FORMAT,
            "version": IDMAP_VERSION,
            "new_to_old": list(map(int, self.new_to_old)),
            "old_tokenizer": self.old_tokenizer,
            "new_tokenizer": self.new_tokenizer,
        }


def write_idmap(idmap: IdMap, path: str) -> None:
    write_json_atomic(path, idmap.to_json())


def read_idmap(path: str, flag: str = "--id-map") -> IdMap:
    """Read and validate an id map: ids unique, within the old vocabulary, sizes consistent."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise IdMapError(f"{flag} {path}: no such file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise IdMapError(f"{flag} {path}: cannot read ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != IDMAP_FORMAT:
        raise IdMapError(f"{flag} {path}: not a {IDMAP_FORMAT} file")
    if obj.get("version") != IDMAP_VERSION:
        raise IdMapError(f"{flag} {path}: unsupported version {obj.get('version')}")
    try:
        ids = [int(i) for i in obj["new_to_old"]]
        old, new = dict(obj["old_tokenizer"]), dict(obj["new_tokenizer"])
        old_size, new_size = int(old["vocab_size"]), int(new["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise IdMapError(f"{flag} {path}: malformed id map ({e!r})") from None
    if len(ids) != new_size:
        raise IdMapError(
            f"{flag} {path}: {len(ids)} entries, but the new tokenizer has {new_size} ids"
        )
    if len(set(ids)) != len(ids):
        raise IdMapError(f"{flag} {path}: an old id appears twice")
    if ids and (min(ids) < 0 or max(ids) >= old_size):
        raise IdMapError(
            f"{flag} {path}: old ids must lie in [0, {old_size}), found {min(ids)}..{max(ids)}"
        )
    return IdMap(ids, old, new, os.path.abspath(path))


def check_fits_checkpoint(idmap: IdMap, checkpoint, flag: str = "--id-map") -> None:
    """The checkpoint must have been trained with the map's old tokenizer: same number of ids and,
    when both record one, the same model sha256."""
    where = f"the checkpoint {checkpoint.flag} {checkpoint.path}"
    vocab = checkpoint.model.vocab_size
    if idmap.old_size != vocab:
        raise IdMapError(
            f"{flag} {idmap.path} maps a {idmap.old_size}-id tokenizer, but {where} has a "
            f"vocabulary of {vocab}: the id map does not fit the checkpoint"
        )
    recorded = checkpoint.tokenizer or {}
    mine, theirs = idmap.old_tokenizer.get("sha256"), recorded.get("sha256")
    if mine and theirs and mine != theirs:
        raise IdMapError(
            f"{flag} {idmap.path} maps tokenizer {idmap.old_tokenizer.get('model')} (sha256 "
            f"{mine}), but {where} was trained with {recorded.get('model')} (sha256 {theirs})"
        )
