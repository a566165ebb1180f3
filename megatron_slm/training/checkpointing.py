"""Checkpoints: megatron-core distributed checkpoints, resumable at any TP/PP.

Layout (Megatron-LM's, so its tooling recognises it)::

    <dir>/latest_checkpointed_iteration.txt     the newest complete iteration ("100")
    <dir>/iter_0000100/                          megatron-core dist_checkpointing directory
        (model, optimizer: sharded; scheduler, consumed samples: common state)
        megatron_slm.json                        model architecture + tokenizer + run metadata
        rng/rank_00000.pt                        per-rank RNG states (exact resume)

A checkpoint is written into ``iter_N.partial`` and renamed after every rank finished, and the
tracker file is replaced atomically last: a crash mid-save never leaves a half checkpoint that a
later ``--load`` would pick up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_slm.atomic_io import write_text_atomic
from megatron_slm.models.presets import GPTModelConfig

logger = logging.getLogger("megatron_slm")

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "megatron_slm.json"
FORMAT_VERSION = 1


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int | None:
    """The newest complete iteration in ``root`` (None when there is none)."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}")
    return int(text)


def resolve_checkpoint(path: str, flag: str = "--load") -> str:
    """A checkpoint root (with a tracker) or an ``iter_N`` directory → the iteration directory."""
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: no such checkpoint directory")
    if os.path.isfile(os.path.join(path, METADATA)):
        return path
    iteration = latest_iteration(path)
    if iteration is None:
        raise ValueError(f"{flag} {path}: no {TRACKER} and no {METADATA}: not a checkpoint")
    return iteration_dir(path, iteration)


def read_metadata(path: str, flag: str = "--load") -> dict:
    """Metadata of the checkpoint at ``path`` (root or iteration directory)."""
    ckpt = resolve_checkpoint(path, flag)
    meta_path = os.path.join(ckpt, METADATA)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{flag}: cannot read {meta_path}: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: unsupported format_version {meta.get('format_version')}")
    return meta


def model_config_from_checkpoint(path: str, flag: str = "--load") -> GPTModelConfig:
    return GPTModelConfig(**read_metadata(path, flag)["model"])


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state["tracker"] = get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(state["tracker"])


@dataclass
class CheckpointState:
    iteration: int
    consumed_samples: int
    metadata: dict


def save_checkpoint(
    root: str,
    iteration: int,
    chunks,
    optimizer=None,
    scheduler=None,
    *,
    consumed_samples: int = 0,
    model_config: GPTModelConfig,
    metadata: dict | None = None,
) -> str:
    """Save model (+ optimizer, scheduler, RNG, data position); returns the iteration dir."""
    rank = dist.get_rank()
    final = iteration_dir(root, iteration)
    partial = final + ".partial"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()

    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state)
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(state, partial)
    os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(partial, "rng", f"rank_{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "model": dataclasses.asdict(model_config),
            "world_size": dist.get_world_size(),
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
            **(metadata or {}),
        }
        write_text_atomic(os.path.join(partial, METADATA), json.dumps(meta, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        write_text_atomic(os.path.join(root, TRACKER), str(iteration))
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def load_checkpoint(
    path: str,
    chunks,
    optimizer=None,
    scheduler=None,
    *,
    weights_only: bool = False,
    flag: str = "--load",
) -> CheckpointState:
    """Load into ``chunks`` (and optimizer/scheduler/RNG unless ``weights_only``).

    Works at any TP/PP: megatron-core reshards on load. With a different parallel layout the
    per-rank RNG states do not apply and are skipped (with a log line).
    """
    ckpt = resolve_checkpoint(path, flag)
    meta = read_metadata(ckpt, flag)
    state = model_sharded_state_dict(chunks)
    if optimizer is not None and not weights_only:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True)
    loaded = dist_checkpointing.load(state, ckpt)
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"])
    if weights_only:
        return CheckpointState(0, 0, meta)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    same_layout = (
        meta.get("world_size") == dist.get_world_size()
        and meta.get("tensor_model_parallel_size")
        == parallel_state.get_tensor_model_parallel_world_size()
        and meta.get("pipeline_model_parallel_size")
        == parallel_state.get_pipeline_model_parallel_world_size()
    )
    rng_file = os.path.join(ckpt, "rng", f"rank_{dist.get_rank():05d}.pt")
    if same_layout and os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.info("parallel layout differs from the checkpoint's: RNG states not restored")
    return CheckpointState(int(loaded["iteration"]), int(loaded["consumed_samples"]), meta)
