"""A refining run's shards, output layout and identity (``run.json``: the settings that determine
the bytes; another run's directory is refused)."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

from megatron_slm.atomic_io import file_sha256, write_json_atomic
from megatron_slm.refine.config import ApplyConfig, RunConfig
from megatron_slm.refine.decision import RefineError

RUN_FORMAT = "megatron-slm-prox-refine"
RUN_VERSION = 1


@dataclass(frozen=True)
class Shard:
    name: str
    path: str


def resolve_shards(patterns: list[str]) -> list[Shard]:
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise RefineError(f"--input {pattern!r}: no such file")
        paths.extend(os.path.abspath(m) for m in matches)
    paths = sorted(set(paths))
    shards, seen = [], {}
    for path in paths:
        base = os.path.basename(path)
        name = base[: -len(".jsonl")] if base.endswith(".jsonl") else base
        if name in seen:
            raise RefineError(
                f"--input: {seen[name]} and {path} would both be output shard {name!r}; rename one"
            )
        seen[name] = path
        shards.append(Shard(name, path))
    return shards


def assigned_shards(shards: list[Shard], run: RunConfig, rank: int, world: int) -> list[Shard]:
    """Round-robin over all workers: job ``--shard-index`` of ``--num-shards``, rank of world."""
    worker = run.shard_index * world + rank
    return shards[worker :: run.num_shards * world]


class Layout:
    def __init__(self, output_dir: str):
        self.root = output_dir
        self.run = os.path.join(output_dir, "run.json")
        self.stats = os.path.join(output_dir, "stats.json")

    def kept(self, shard: Shard) -> str:
        return os.path.join(self.root, f"{shard.name}.jsonl")

    def dropped(self, shard: Shard) -> str:
        return os.path.join(self.root, "dropped", f"{shard.name}.jsonl")

    def shard_stats(self, shard: Shard) -> str:
        return os.path.join(self.root, "shards", f"{shard.name}.json")

    def lock(self, shard: Shard) -> str:
        return os.path.join(self.root, "shards", f"{shard.name}.lock")

    def journal(self, shard: Shard) -> str:
        """``--backend openai``: the server's answers for an unfinished shard."""
        return os.path.join(self.root, "shards", f"{shard.name}.journal.jsonl")

    def is_done(self, shard: Shard) -> bool:
        return all(
            os.path.exists(p)
            for p in (self.shard_stats(shard), self.kept(shard), self.dropped(shard))
        )


def _model_identity(model_dir: str) -> dict:
    config = os.path.join(model_dir, "config.json")
    return {
        "path": os.path.abspath(model_dir),
        "config_sha256": file_sha256(config) if os.path.isfile(config) else None,
    }


def run_manifest(shards: list[Shard], run: RunConfig, mode) -> dict:
    """Everything that determines the output bytes (not the rank layout, device or backend)."""
    manifest = {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "inputs": {s.name: s.path for s in shards},
        "text_key": run.text_key,
        "rule": {
            "drop_ratio": run.drop_ratio,
            "drop_words": run.drop_words,
            "max_errors": run.max_errors,
        },
    }
    if run.semantics != "strict":  # absent = strict: run directories of earlier versions resume
        manifest["semantics"] = run.semantics
    if isinstance(mode, ApplyConfig):
        manifest["mode"] = "apply"
        manifest["programs"] = {
            "path": os.path.abspath(mode.programs),
            "sha256": file_sha256(mode.programs),
            "id_key": mode.id_key,
        }
        manifest["tokenizer"] = os.path.abspath(mode.tokenizer) if mode.tokenizer else None
    else:
        manifest["mode"] = "model"
        manifest["model"] = {
            "stage": mode.stage,
            "doc_model": _model_identity(mode.doc_model) if "doc" in mode.stages else None,
            "chunk_model": _model_identity(mode.chunk_model) if "chunk" in mode.stages else None,
            "dtype": mode.dtype,
            "window": mode.window,
            "doc_max_prompt_tokens": mode.doc_max_prompt_tokens,
            "chunk_max_tokens": mode.chunk_max_tokens,
            "doc_max_new_tokens": mode.doc_max_new_tokens,
            "chunk_max_new_tokens": mode.chunk_max_new_tokens,
            "line_prefix": mode.line_prefix,
        }
        if mode.doc_template != "model":  # absent = model: earlier run directories resume
            manifest["model"]["doc_template"] = mode.doc_template
    return manifest


def claim_output_dir(layout: Layout, manifest: dict) -> None:
    """Create the output directory for this run, or check that it holds this run's shards."""
    os.makedirs(os.path.join(layout.root, "dropped"), exist_ok=True)
    os.makedirs(os.path.join(layout.root, "shards"), exist_ok=True)
    if not os.path.exists(layout.run):
        foreign = sorted(f for f in os.listdir(layout.root) if f.endswith(".jsonl"))
        # another rank of this run may have claimed the directory (and finished a shard) since
        if foreign and not os.path.exists(layout.run):
            raise RefineError(
                f"--output-dir {layout.root} holds JSONL files without a run.json (e.g. "
                f"{foreign[0]}); use a new --output-dir"
            )
        if not os.path.exists(layout.run):
            write_json_atomic(layout.run, manifest)  # ranks racing here write the same bytes
    try:
        with open(layout.run) as f:
            previous = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RefineError(f"--output-dir: {layout.run} is unreadable ({e})") from None
    if previous != manifest:
        keys = sorted(
            k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k)
        )
        raise RefineError(
            f"--output-dir {layout.root} holds another run's shards ({layout.run} differs "
            f"in: {', '.join(keys)}); use a new --output-dir or delete it"
        )
