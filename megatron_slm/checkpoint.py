"""Checkpoints: megatron-core distributed checkpoints, resumable at any TP/PP.

Layout (Megatron-LM's, so its tooling recognises it)::

    <dir>/latest_checkpointed_iteration.txt     the newest complete iteration ("100")
    <dir>/iter_0000100/                          megatron-core dist_checkpointing directory
        (model, optimizer: sharded; scheduler, consumed samples: common state)
        megatron_slm.json                        model architecture + tokenizer + run metadata
        rng/rank_00000.pt                        per-rank RNG states (exact resume)

A checkpoint is written into ``iter_N.partial`` and renamed after every rank finished (swapped
with an existing ``iter_N`` in one atomic exchange), and the tracker file is replaced atomically
last: a crash mid-save never leaves a half checkpoint that a later ``--load`` would pick up, nor a
tracker naming a missing directory. The RNG files hold no pickled objects and load with
``weights_only=True`` (:func:`load_rng_file`); megatron-core's own reader unpickles the
checkpoint's ``.metadata``, so ``--load`` trusts its input, as ``torch.load`` does.

Checkpoints describe themselves (``megatron_slm.json``, the one home of checkpoint facts): the full
architecture and how it was chosen (preset + overrides), the tokenizer (type, file, vocabulary
size, sha256 of its model file), the padded vocabulary and its divisor, the parameter dtype and the
parallel layout it was saved with. Every loader reads them, so ``--load DIR`` alone is enough;
:func:`resolve_architecture` and :func:`check_tokenizer` refuse flags that contradict them before
any work. Keys are only ever added: checkpoints of older versions of this code keep loading.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_slm import launch, writer_queue
from megatron_slm.atomic_io import current_umask, fsync_dir, write_text_atomic
from megatron_slm.cli import arg
from megatron_slm.crash_points import CrashPoints
from megatron_slm.errors import CheckpointError, ConfigError, TokenizerError
from megatron_slm.models.args import DEFAULT_VOCAB_DIVISOR, ModelArgs, flag_text
from megatron_slm.models.presets import (
    KIND_FIELDS,
    GPTModelConfig,
    get_preset,
    moe_layer_pattern,
    padded_vocab_size,
)
from megatron_slm.models.sharding import unwrap
from megatron_slm.models.upcycling import dense_flags, upcycled_architecture
from megatron_slm.optimizer_state import (
    DP_RESHARDABLE,
    OPTIMIZER_SHARDINGS,
    optimizer_sharded_state_dict,
    restore_distributed_adam_steps,
)

logger = logging.getLogger("megatron_slm")

TRACKER = "latest_checkpointed_iteration.txt"
NON_PERSISTENT_SUBDIR = "non_persistent"  # Megatron-LM's, inside --save / --load
METADATA = "megatron_slm.json"
FORMAT_VERSION = 1
# Tests SIGKILL a save at a named point (crash_points.py): "swap" (just before the new iteration
# directory takes the old one's place), "swapped" (just after it, before the tracker is replaced),
# "publish" (a converter's complete output, before it replaces --save), "saved" (a checkpoint
# published and the ones it supersedes deleted).
KILL_HOOK_ENV = "MEGATRON_SLM_CHECKPOINT_KILL_AT"
_crash = CrashPoints(KILL_HOOK_ENV)
_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or
    the filesystem cannot (then nothing changed)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def replace_directory(new: str, final: str) -> None:
    """Publish the complete directory ``new`` as ``final`` (same parent), replacing a previous
    ``final`` only once ``new`` is complete.

    An existing ``final`` is swapped with ``new`` in one atomic exchange, so ``final`` names a
    complete directory at every instant, then the old one (now at ``new``) is deleted. Where the
    filesystem cannot exchange (NFS, old kernels) the old directory is renamed aside first and
    ``final`` is missing between two renames (logged)."""
    if not os.path.lexists(final):
        os.rename(new, final)
    elif _exchange(new, final):
        shutil.rmtree(new)
    else:
        logger.warning("%s: no atomic directory exchange here; replacing in two renames", final)
        aside = tempfile.mkdtemp(
            prefix=f".{os.path.basename(final)}.",
            suffix=".old",
            dir=os.path.dirname(os.path.abspath(final)),
        )
        os.rename(final, os.path.join(aside, "old"))
        os.rename(new, final)
        shutil.rmtree(aside)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


def overwrite_arg():
    """The ``--overwrite`` flag of every converter that writes a whole new ``--save``."""
    return arg(
        False,
        "Replace a non-empty --save (the old output goes only once the new one is complete); "
        "without it a non-empty --save is refused.",
    )


def check_new_output_dir(save: str, overwrite: bool, flag: str = "--save") -> None:
    """Converters write a whole new directory: a non-empty ``save`` (a training run's checkpoints,
    an earlier export) is refused unless ``overwrite``, before any work."""
    if os.path.lexists(save) and not os.path.isdir(save):
        raise ConfigError(f"{flag} {save} exists and is not a directory")
    if overwrite or not os.path.isdir(save) or not os.listdir(save):
        return
    iteration = latest_iteration(save)
    what = (
        f"holds a checkpoint (iteration {iteration})" if iteration is not None else "is not empty"
    )
    raise ConfigError(
        f"{flag} {save} {what}: choose a new directory or pass --overwrite to replace it"
    )


def staging_dir(save: str) -> str:
    """A fresh directory ``.<name>.<random>.partial`` beside ``save`` to write a new output into
    (made by rank 0, the same path on every rank); :func:`publish_output_dir` puts it in place."""
    parent = os.path.dirname(os.path.abspath(save))
    staged = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(parent, exist_ok=True)
        name = os.path.basename(os.path.abspath(save))
        staged[0] = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent)
        os.chmod(staged[0], 0o777 & ~current_umask())  # mkdtemp makes 0700: the usual mode
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(staged, src=0)
    return staged[0]


def publish_output_dir(staged: str, save: str) -> None:
    """Put the complete ``staged`` directory in place of ``save`` (:func:`replace_directory`: an
    old ``save`` is replaced only now), on rank 0, after every rank finished writing."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        _crash.reached("publish")
        replace_directory(staged, os.path.abspath(save))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def discard_staging_dir(staged: str) -> None:
    """Remove a staging directory after a failure (rank 0)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(staged, ignore_errors=True)


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int | None:
    """The newest complete iteration in ``root`` (None when there is none)."""
    text = _tracker_text(root)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()):
        raise CheckpointError(
            f"{os.path.join(root, TRACKER)}: expected an iteration number, found {text!r}"
        )
    return int(text)


def tracked_iteration_dir(root: str) -> str | None:
    """The directory the tracker of ``root`` names: ``iter_N``, or Megatron-LM's ``release``
    (None: no tracker)."""
    if _tracker_text(root) == "release":
        return os.path.join(root, "release")
    iteration = latest_iteration(root)
    return None if iteration is None else iteration_dir(root, iteration)


def _tracker_text(root: str) -> str | None:
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    try:
        with open(tracker, encoding="utf-8") as f:
            return f.read(64).strip()
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8 text
        raise CheckpointError(f"{tracker}: unreadable ({exc})") from None


def checkpoint_at_step(root: str, step: int, flag: str = "--load") -> str:
    """``--ckpt-step``: the iteration directory of ``step`` in the checkpoint root ``root``
    (Megatron-LM's flag: that iteration instead of the tracker's latest)."""
    if not root:
        raise ConfigError(f"--ckpt-step needs {flag}")
    if step < 0:
        raise ConfigError(f"--ckpt-step must be >= 0, got {step}")
    if os.path.isfile(os.path.join(root, METADATA)):
        raise CheckpointError(
            f"--ckpt-step {step}: {flag} {root} is one iteration's directory already; give the "
            "checkpoint root"
        )
    path = iteration_dir(root, step)
    if not os.path.isfile(os.path.join(path, METADATA)):
        names = os.listdir(root) if os.path.isdir(root) else []
        saved = sorted(
            int(n[len("iter_") :])
            for n in names
            if n.startswith("iter_")
            and n[len("iter_") :].isdigit()
            and os.path.isfile(os.path.join(root, n, METADATA))
        )
        have = f" (it holds {', '.join(map(str, saved))})" if saved else ""
        raise CheckpointError(f"--ckpt-step {step}: {flag} {root} holds no iteration {step}{have}")
    return path


def resolve_checkpoint(path: str, flag: str = "--load") -> str:
    """A checkpoint root (with a tracker) or an ``iter_N`` directory → the iteration directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{flag} {path}: no such checkpoint directory")
    if os.path.isfile(os.path.join(path, METADATA)):
        return path
    _refuse_megatron_lm_checkpoint(path, flag)
    iteration = latest_iteration(path)
    if iteration is None:
        raise CheckpointError(f"{flag} {path}: no {TRACKER} and no {METADATA}: not a checkpoint")
    ckpt = iteration_dir(path, iteration)
    if not os.path.isfile(os.path.join(ckpt, METADATA)):
        what = "directory" if not os.path.isdir(ckpt) else METADATA
        raise CheckpointError(
            f"{flag} {path}: incomplete checkpoint: {TRACKER} names iteration {iteration}, but "
            f"its {what} {os.path.join(ckpt, METADATA) if what == METADATA else ckpt} is missing "
            "(copy the checkpoint again, or point --load at a complete iter_N directory)"
        )
    return ckpt


def _refuse_megatron_lm_checkpoint(path: str, flag: str) -> None:
    """A checkpoint with megatron-core's ``common.pt`` but no ``megatron_slm.json`` (in ``path``
    or the iteration its tracker names, ``release`` too): Megatron-LM's own, or a copy cut
    short; say what to do for either."""
    for ckpt in (path, tracked_iteration_dir(path)):
        if (
            ckpt
            and os.path.isfile(os.path.join(ckpt, "common.pt"))
            and not os.path.isfile(os.path.join(ckpt, METADATA))
        ):
            raise CheckpointError(
                f"{flag} {path}: {ckpt} has megatron-core's common.pt but no {METADATA}: a "
                "Megatron-LM checkpoint is converted first (python tools/convert_checkpoint.py "
                f"megatron-lm-to-megatron --load {path} --save DIR); a megatron_slm one was "
                "copied without it (copy it again)"
            )


def holds_checkpoint(path: str) -> bool:
    """Whether ``path`` is a checkpoint root with a tracker or an iteration directory (complete
    or not: :func:`resolve_checkpoint` says what is wrong with it)."""
    return os.path.isfile(os.path.join(path, METADATA)) or latest_iteration(path) is not None


def read_metadata(path: str, flag: str = "--load") -> dict:
    """Metadata of the checkpoint at ``path`` (root or iteration directory)."""
    ckpt = resolve_checkpoint(path, flag)
    meta_path = os.path.join(ckpt, METADATA)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{flag}: cannot read {meta_path}: {exc}") from None
    _check_metadata(meta, meta_path)
    return meta


# Types of the metadata keys readers use (None allowed): a damaged file fails here, once, naming
# the key, instead of as an AttributeError deep in a loader.
_META_TYPES = {
    "model": dict,
    "tokenizer": dict,
    "config": dict,
    "seq_length": int,
    "padded_vocab_size": int,
    "make_vocab_size_divisible_by": int,
    "iteration": int,
    "params_dtype": str,
    "optimizer_layout": dict,
    "lr_schedule": dict,
}


def _check_metadata(meta, meta_path: str) -> None:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: unsupported format_version {meta.get('format_version')!r}"
        )
    for key, kind in _META_TYPES.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise CheckpointError(
                f"{meta_path}: {key!r} must be a {kind.__name__}, found {value!r:.80}"
            )
    if meta.get("params_dtype") is not None and not isinstance(
        getattr(torch, meta["params_dtype"], None), torch.dtype
    ):
        raise CheckpointError(f"{meta_path}: unknown params_dtype {meta['params_dtype']!r:.80}")
    sharding = (meta.get("optimizer_layout") or {}).get("format")
    if sharding not in (None, *OPTIMIZER_SHARDINGS):
        raise CheckpointError(f"{meta_path}: unknown optimizer_layout.format {sharding!r:.80}")
    for section in ("training",):
        value = (meta.get("config") or {}).get(section)
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"{meta_path}: config.{section} must be an object")


def optimizer_sharding(meta: dict) -> str:
    """The distributed optimizer's checkpoint format a checkpoint's metadata records (the one
    its save writes): ``optimizer_layout.format``; records without it are per bucket."""
    return (meta.get("optimizer_layout") or {}).get("format") or DP_RESHARDABLE


def model_sharded_state_dict(chunks) -> dict:
    # (MTP heads on a later stage than the embedding keep a tied copy of it: megatron-core
    # marks its replicas over the data-parallel group the metadata names)
    extra = {}
    if any(getattr(unwrap(c), "mtp_process", False) for c in chunks):
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        extra = {"metadata": {"dp_cp_group": group}}
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict(**extra)}
    return {f"model{i}": unwrap(c).sharded_state_dict(**extra) for i, c in enumerate(chunks)}


# RNG files hold only tensors, numbers, strings, tuples and dicts, so they load with
# ``torch.load(weights_only=True)``: loading a checkpoint never unpickles code from it. numpy's
# state array is stored as a tensor; files written before this form (with a pickled
# ``np.ndarray``) load under an allow-list of exactly numpy's array-reconstruction globals.
RNG_FORMAT = 2


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "format": RNG_FORMAT,
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # [624] uint32 values
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state["tracker"] = get_cuda_rng_tracker().get_states()
    return state


def _numpy_state(saved):
    if isinstance(saved, dict):  # RNG_FORMAT 2
        keys = saved["keys"].numpy().astype(np.uint32)
        return (saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
    return saved  # format 1: the tuple np.random.get_state() returns


def _numpy_safe_globals() -> list:
    """The globals a pickled ``np.ndarray`` of uint32 needs (old RNG files), nothing more."""
    from numpy._core import multiarray

    return [
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
        multiarray._reconstruct,
        # the name numpy 1.x wrote the same function under
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    ]


def load_rng_file(path: str) -> dict:
    """Read an RNG file with ``weights_only=True``; anything else in it is a ``CheckpointError``
    naming the file (never executed)."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, or a damaged zip archive
        raise CheckpointError(
            f"{path}: refused: not a plain RNG state file ({_unpickle_reason(exc)}); "
            "checkpoints load with weights_only=True and never run code from the file"
        ) from None
    if not isinstance(state, dict) or not {"python", "numpy", "torch", "tracker"} <= set(state):
        raise CheckpointError(f"{path}: not an RNG state file (missing keys)")
    return state


def _unpickle_reason(exc: Exception) -> str:
    # torch's message is a paragraph that ends by suggesting weights_only=False; keep the cause.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "unsupported" in ln.lower() and not ln.startswith("Weights only load failed"):
            return ln.split("WeightsUnpickler error:")[-1].strip().rstrip(".")
    return lines[0][:200] if lines else type(exc).__name__


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
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
    fully_parallel: bool = False,
    async_queue=None,
    save_rng: bool = True,
    retain_interval: int | None = None,
    keep_latest_only: bool = False,
    on_published=None,
    strategies: dict | None = None,
) -> str:
    """Save model (+ optimizer, scheduler, RNG, data position); returns the iteration dir.

    ``metadata`` adds to the recorded facts: ``tokenizer`` (:func:`tokenizer_record`),
    ``model_args`` (``ModelArgs.record()``), ``make_vocab_size_divisible_by``, ``params_dtype``.
    ``fully_parallel``: the data-parallel ranks share the writing of what they all hold
    (Megatron-LM's ``--ckpt-fully-parallel-save``); else data-parallel rank 0 writes it.
    ``async_queue`` (megatron-core's ``AsyncCallsQueue``; Megatron-LM's ``--async-save``): the
    tensors are staged in host memory and written by a forked process while training goes on;
    the directory is published (metadata, rename, tracker) when the caller finalizes the queue
    after every rank's writer finished. Until then the previous checkpoint stays the latest.
    ``optimizer_saved`` in the metadata says whether the optimizer state is in it; ``save_rng``
    False leaves the RNG states out (``--no-save-optim``, ``--no-save-rng``).

    Once published, the checkpoints it supersedes are deleted (:func:`drop_superseded`):
    ``retain_interval`` (``--save-retain-interval``) the previous latest, unless its iteration is
    a multiple of it; ``keep_latest_only`` (a non-persistent directory) every other one.
    ``on_published(dropped_iterations)`` runs on rank 0 then (``--log-progress``).

    ``strategies`` (``--ckpt-assume-constant-structure``): the caller's cache of writers, one per
    kind of save (with or without the optimizer state), kept across saves: after a kind's first
    save its plan and metadata are reused (megatron-core's cached structure) and the sharding's
    integrity is not checked again."""
    rank = dist.get_rank()
    final = iteration_dir(root, iteration)
    partial = final + ".partial"
    writer_queue.install()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()

    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        sharding = optimizer_sharding(metadata or {})
        state["optimizer"] = optimizer_sharded_state_dict(optimizer, state, sharding=sharding)
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    strategy, validate = _save_strategy(fully_parallel), True
    if strategies is not None:  # (a save of another structure has a writer of its own)
        kind = "full" if optimizer is not None else "weights"
        validate = kind not in strategies
        if validate:
            strategies[kind] = _save_strategy(fully_parallel, cached=True)
        strategy = strategies[kind]
    request = dist_checkpointing.save(
        state,
        partial,
        strategy,
        async_sharded_save=async_queue is not None,
        validate_access_integrity=validate,
    )
    if save_rng:
        os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(partial, "rng", f"rank_{rank:05d}.pt"))
    meta = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "model": dataclasses.asdict(model_config),
        # The embedding's rows at this TP (GPTModel keeps the padded size it was built with).
        "padded_vocab_size": unwrap(chunks[0]).vocab_size,
        "world_size": dist.get_world_size(),
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "expert_tensor_parallel_size": parallel_state.get_expert_tensor_parallel_world_size(),
        "rank_order": launch.rank_order(),
        "optimizer_saved": optimizer is not None,
        **(metadata or {}),
    }

    def publish() -> None:
        dist.barrier()
        if rank == 0:
            write_text_atomic(os.path.join(partial, METADATA), json.dumps(meta, indent=2))
            # The tracker may name ``final`` (re-saving an iteration): it must never name a
            # missing directory, so the new directory takes the old one's place in one exchange.
            _crash.reached("swap")
            replace_directory(partial, final)
            _crash.reached("swapped")
            previous = _latest_or_none(root)
            write_text_atomic(os.path.join(root, TRACKER), str(iteration))
            logger.info("saved checkpoint %s", final)
            dropped = drop_superseded(root, iteration, previous, retain_interval, keep_latest_only)
            if on_published is not None:
                on_published(dropped)
            _crash.reached("saved")
        dist.barrier()

    if request is None:
        publish()
    else:
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(request)
    return final


def _latest_or_none(root: str) -> int | None:
    try:
        return latest_iteration(root)
    except CheckpointError:  # a damaged tracker: the new one replaces it
        return None


def drop_superseded(
    root: str,
    iteration: int,
    previous: int | None,
    retain_interval: int | None = None,
    keep_latest_only: bool = False,
) -> list[int]:
    """Delete the checkpoints of ``root`` that the just-published ``iteration`` supersedes;
    returns their iterations. ``retain_interval``: Megatron-LM's ``--save-retain-interval``,
    the ``previous`` latest unless its iteration is a multiple of it (an older latest only: a
    run resumed from an earlier step never deletes a later checkpoint). ``keep_latest_only``:
    every other iteration directory (a non-persistent directory holds one checkpoint).

    Each directory is renamed to ``iter_N.deleting`` first, in one atomic step, then removed:
    a crash mid-removal never leaves a partial ``iter_N``; a later call removes the rest. A
    symbolic link (a checkpoint kept elsewhere) is left alone."""
    doomed = []
    if keep_latest_only:
        doomed = [i for i in map(_iteration_of, os.listdir(root)) if i not in (None, iteration)]
    elif retain_interval and previous is not None and previous < iteration:
        doomed = [previous] if previous % retain_interval else []
    dropped = []
    for i in sorted(doomed):
        path = iteration_dir(root, i)
        if os.path.islink(path):
            logger.info("not deleting %s: a symbolic link", path)
        elif os.path.isdir(path):
            shutil.rmtree(path + ".deleting", ignore_errors=True)  # (an earlier crash's)
            os.replace(path, path + ".deleting")
            dropped.append(i)
    for name in os.listdir(root):
        if name.endswith(".deleting") and _iteration_of(name.removesuffix(".deleting")) is not None:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if dropped:
        logger.info("deleted the superseded checkpoints of iterations %s in %s", dropped, root)
    return dropped


def _iteration_of(name: str) -> int | None:
    """``iter_0000100`` -> 100; None for any other name."""
    digits = name.removeprefix("iter_")
    return int(digits) if name.startswith("iter_") and digits.isdigit() else None


def _save_strategy(fully_parallel: bool, cached: bool = False):
    """megatron-core's default writer, or (``fully_parallel``, more than one data-parallel rank)
    that writer with each replicated tensor assigned to one data-parallel rank, balancing the
    bytes each writes (only metadata is exchanged). ``cached``: a writer to keep across saves of
    one structure, reusing its plans, metadata and distribution (None: the default writer)."""
    group = _data_parallel_group_if_several() if fully_parallel else None
    if group is None and not cached:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    writer = get_default_save_sharded_strategy()
    writer.use_cached_ckpt_structure = cached
    if group is None:
        return writer
    return FullyParallelSaveStrategyWrapper(writer, group, do_cache_distribution=cached)


def _data_parallel_group_if_several():
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return group if group.size() > 1 else None


def _load_strategy(fully_parallel: bool, ckpt: str):
    """megatron-core's default reader, or (``fully_parallel``, several data-parallel ranks) that
    reader on a share of the tensors per data-parallel rank, which then broadcast them."""
    group = _data_parallel_group_if_several() if fully_parallel else None
    if group is None:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(ckpt), group)


def _absent_items(state: dict, ckpt: str) -> set[tuple[str, str]]:
    """``(part, key)`` of the requested items (tensors, factories, objects) the checkpoint does
    not hold, from its sharded metadata."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    present = set(load_sharded_metadata(ckpt))
    absent = set()
    for part, items in state.items():
        for key, item in items.items() if isinstance(items, dict) else ():
            bases = nested_values(item) if isinstance(item, (dict, list)) else [item]
            names = [b.unique_key if isinstance(b, ShardedObject) else b.key
                     for b in bases if isinstance(b, ShardedBase)]  # fmt: skip
            if any(name not in present for name in names):
                absent.add((part, key))
    return absent


def _load_sharded(state, ckpt: str, strategy, strict: str, flag: str) -> dict:
    """megatron-core's load under ``strict`` (``--dist-ckpt-strictness``). The model's items the
    checkpoint lacks are found here first: megatron-core 0.16 drops them itself only where no
    tensor factory is near (its merge of a SwiGLU weight's halves fails otherwise). ``raise_*``
    refuses them in one line; the other non-default values load without them."""
    from megatron.core.dist_checkpointing.core import CheckpointingException

    suffix = f"(--dist-ckpt-strictness {strict})"
    if strict != "assume_ok_unexpected":
        absent = _absent_items(state, ckpt)
        if absent and strict.startswith("raise"):
            keys = sorted(key for _, key in absent if "_extra_state" not in key)
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            raise CheckpointError(
                f"{flag} {ckpt}: lacks {len(keys)} of the model's weights: "
                f"{', '.join(keys[:5])}{more} {suffix}"
            )
        for part, key in absent:
            del state[part][key]
    try:
        loaded = dist_checkpointing.load(state, ckpt, strategy, strict=strict)
    except CheckpointingException as e:  # (raise_all: keys nothing requested, e.g. optimizer)
        if not strict.startswith("raise"):
            raise
        title, _, keys = str(e).strip().partition("\n")
        keys = keys if len(keys) <= 300 else keys[:300] + "..."
        raise CheckpointError(f"{flag} {ckpt}: {title.strip()} {keys.strip()} {suffix}") from None
    return loaded[0] if isinstance(loaded, tuple) else loaded


def load_checkpoint(
    path: str,
    chunks,
    optimizer=None,
    scheduler=None,
    *,
    weights_only: bool = False,
    flag: str = "--load",
    fully_parallel: bool = False,
    load_rng: bool = True,
    fresh: tuple[str, ...] = (),
    strict: str = "assume_ok_unexpected",
) -> CheckpointState:
    """Load into ``chunks`` (and optimizer/scheduler/RNG unless ``weights_only``).

    Works at any TP/PP: megatron-core reshards on load. With a different parallel layout the
    per-rank RNG states do not apply and are skipped (with a log line). ``path`` may be the
    :class:`CheckpointInfo` a loader already read: its metadata is not read again.
    ``fully_parallel``: the data-parallel ranks share the reading (Megatron-LM's
    ``--ckpt-fully-parallel-load``). ``load_rng=False``: the random states stay this run's
    (``--no-load-rng``). ``fresh``: prefixes of the model's keys the checkpoint does not hold
    (with ``weights_only``: modules added since, e.g. multi-token prediction heads), which keep
    their initialisation. ``strict``: megatron-core's ``StrictHandling`` of the keys the two do
    not share (``--dist-ckpt-strictness``); where it loads without the model's keys the
    checkpoint lacks, those weights keep their initialisation too (logged).
    """
    if isinstance(path, CheckpointInfo):
        ckpt, meta = path.path, path.meta
    else:
        ckpt = resolve_checkpoint(path, flag)
        meta = read_metadata(ckpt, flag)
    state = model_sharded_state_dict(chunks)
    if fresh:
        state = {name: {k: v for k, v in part.items() if not k.startswith(fresh)}
                 for name, part in state.items()}  # fmt: skip
    if optimizer is not None and not weights_only:
        state["optimizer"] = optimizer_sharded_state_dict(
            optimizer, state, is_loading=True, sharding=optimizer_sharding(meta)
        )
    loaded = _load_sharded(state, ckpt, _load_strategy(fully_parallel, ckpt), strict, flag)
    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for name, chunk in zip(names, chunks):
        weights = loaded[name]
        kept = unwrap(chunk).state_dict()
        absent = [k for k in kept if k not in weights]
        weights.update({k: kept[k] for k in absent})
        # (a module's _extra_state may be absent: megatron-core's modules then keep theirs)
        unexpected = [k for k in absent if not k.startswith(fresh) and "_extra_state" not in k]
        if unexpected and dist.get_rank() == 0:
            more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
            logger.warning(
                "%s %s lacks %d of the model's weights, which keep their initialisation "
                "(--dist-ckpt-strictness %s): %s%s",
                flag, ckpt, len(unexpected), strict, ", ".join(unexpected[:5]), more,
            )  # fmt: skip
        unwrap(chunk).load_state_dict(weights)
    if weights_only:
        return CheckpointState(0, 0, meta)
    if optimizer is not None:
        # no_grad: the distributed optimizer copies into its fp32 main parameters, which for
        # fp32 weights are views of them
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        restore_distributed_adam_steps(optimizer)
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    same_layout = (
        meta.get("world_size") == dist.get_world_size()
        and meta.get("tensor_model_parallel_size")
        == parallel_state.get_tensor_model_parallel_world_size()
        and meta.get("pipeline_model_parallel_size")
        == parallel_state.get_pipeline_model_parallel_world_size()
        # (the experts' random states are seeded by their expert-TP rank; absent: the TP size)
        and meta.get("expert_tensor_parallel_size", meta.get("tensor_model_parallel_size"))
        == parallel_state.get_expert_tensor_parallel_world_size()
        # (each global rank's file: the same rank must hold the same place in the layout)
        and meta.get("rank_order", launch.DEFAULT_RANK_ORDER) == launch.rank_order()
    )
    rng_file = os.path.join(ckpt, "rng", f"rank_{dist.get_rank():05d}.pt")
    if not load_rng:
        logger.info("--no-load-rng: RNG states not restored")
    elif same_layout and os.path.isfile(rng_file):
        _set_rng_state(load_rng_file(rng_file))
    else:
        logger.info("parallel layout differs from the checkpoint's: RNG states not restored")
    return CheckpointState(int(loaded["iteration"]), int(loaded["consumed_samples"]), meta)


# ---------------------------------------------------------------------------------------------
# checkpoint facts: what a checkpoint says about itself, and the flags that may contradict it
# ---------------------------------------------------------------------------------------------
def tokenizer_record(tokenizer_type: str, tokenizer_model: str | None, tokenizer) -> dict:
    """The tokenizer identity a checkpoint records (absolute paths: tools run from other dirs).
    A GPT2BPETokenizer's ``model`` is its vocab file, beside its ``merge_file``."""
    record = {
        "type": tokenizer_type,
        "model": os.path.abspath(tokenizer_model) if tokenizer_model else None,
        "vocab_size": tokenizer.vocab_size,
    }
    merge_file = tokenizer.unique_identifiers.get("merge_file")
    if merge_file:
        record["merge_file"] = merge_file
    sha = tokenizer.unique_identifiers.get("sha256")
    if sha:
        record["sha256"] = sha
    if tokenizer_type == "TikTokenizer":  # what else its ids depend on
        record["tiktoken"] = tokenizer.options()
    return record


def checkpoint_tensor_info(path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor of a checkpoint (reads metadata only)."""
    return iteration_tensor_info(resolve_checkpoint(path))


def iteration_tensor_info(iteration: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """:func:`checkpoint_tensor_info` of an iteration directory of megatron-core's format, ours
    or not (Megatron-LM's)."""
    meta = dist_checkpointing.load_tensors_metadata(iteration)
    return {k: (tuple(v.global_shape), v.dtype) for k, v in meta.items()}


def divisible_by_for_padded(vocab: int, padded: int, divisible_by: int, tp: int) -> int:
    """A ``--make-vocab-size-divisible-by`` giving exactly ``padded`` rows at this TP size (the
    one vocabulary-padding rule of every loader: a checkpoint's padded rows are kept)."""
    if padded_vocab_size(vocab, divisible_by, tp) == padded:
        return divisible_by
    if padded % tp == 0 and padded >= vocab:
        return padded // tp
    raise CheckpointError(
        f"the checkpoint's padded vocabulary {padded} cannot be split over "
        f"--tensor-model-parallel-size {tp}"
    )


@dataclass(frozen=True)
class CheckpointInfo:
    """The recorded facts of one checkpoint (an iteration directory)."""

    path: str
    meta: dict
    flag: str = "--load"

    @property
    def model(self) -> GPTModelConfig:
        try:
            return GPTModelConfig(**self.meta["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{self.flag} {self.path}: bad model config in {METADATA} ({e})"
            ) from None

    @property
    def padded_vocab_size(self) -> int:
        if self.meta.get("padded_vocab_size"):
            return int(self.meta["padded_vocab_size"])
        for key, (shape, _) in checkpoint_tensor_info(self.path).items():
            if key.endswith(("embedding.word_embeddings.weight", "output_layer.weight")):
                return shape[0]
        raise CheckpointError(f"{self.flag} {self.path}: no embedding or output layer tensor")

    @property
    def vocab_divisor(self) -> int:
        return int(self.meta.get("make_vocab_size_divisible_by") or DEFAULT_VOCAB_DIVISOR)

    @property
    def tokenizer(self) -> dict | None:
        return self.meta.get("tokenizer") or None

    @property
    def seq_length(self) -> int | None:
        """The sequence length the model was trained with, when recorded."""
        training = (self.meta.get("config") or {}).get("training") or {}
        value = self.meta.get("seq_length") or training.get("seq_length")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise CheckpointError(f"{self.path}/{METADATA}: seq_length {value!r:.80} is not an int")
        return int(value) if value else None

    @property
    def params_dtype(self) -> torch.dtype | None:
        name = self.meta.get("params_dtype")
        return getattr(torch, name) if name else None

    def divisor_for(self, tensor_model_parallel_size: int) -> int:
        """The vocabulary divisor that keeps this checkpoint's padded rows at this TP size."""
        try:
            return divisible_by_for_padded(
                self.model.vocab_size,
                self.padded_vocab_size,
                self.vocab_divisor,
                tensor_model_parallel_size,
            )
        except ValueError as e:
            raise CheckpointError(f"{self.flag} {self.path}: {e}") from None


def read_checkpoint(path: str, flag: str = "--load") -> CheckpointInfo:
    ckpt = resolve_checkpoint(path, flag)
    return CheckpointInfo(ckpt, read_metadata(ckpt, flag), flag)


def resolve_architecture(
    model_args: ModelArgs,
    checkpoint: CheckpointInfo | None,
    vocab_size: int | None,
    vocab_source: str = "the tokenizer",
) -> GPTModelConfig:
    """The architecture to build: the checkpoint's when there is one (explicit flags must agree
    with it), else the flags' own with the tokenizer's vocabulary. Errors name the flag and both
    values; the TP/PP layout is free (it is not part of the architecture)."""
    if checkpoint is None:
        if vocab_size is None:
            raise CheckpointError(
                "no tokenizer and no --load checkpoint: the vocabulary is unknown"
            )
        return model_args.architecture(vocab_size)
    arch = checkpoint.model
    where = f"the checkpoint {checkpoint.flag} {checkpoint.path}"
    if model_args.model_preset is not None:
        preset = get_preset(model_args.model_preset).replace(**model_args.overrides())
        for f in dataclasses.fields(GPTModelConfig):
            if f.name == "vocab_size" or f.name in model_args.overrides():
                continue
            mine, theirs = getattr(preset, f.name), getattr(arch, f.name)
            if mine != theirs:
                raise CheckpointError(
                    f"--model-preset {model_args.model_preset} has {flag_text(f.name, mine)}, "
                    f"but {where} has {flag_text(f.name, theirs)}: drop --model-preset to use the "
                    "checkpoint's architecture"
                )
    for name, value in model_args.overrides().items():
        if name == "moe_layer_freq":  # Megatron-LM's N or a pattern: the checkpoint records one
            value = moe_layer_pattern(value, arch.num_layers)
        if value != getattr(arch, name):
            theirs = getattr(arch, name)
            raise CheckpointError(
                f"{flag_text(name, value)} contradicts {where} "
                f"({flag_text(name, theirs) if name in KIND_FIELDS else theirs}): drop the flag "
                "to use the checkpoint's architecture"
            )
    if vocab_size is not None and vocab_size != arch.vocab_size:
        raise CheckpointError(
            f"{vocab_source} has {vocab_size} ids, but {where} was trained with a vocabulary of "
            f"{arch.vocab_size}"
        )
    model_args.check_head_size(arch, where)
    return arch


def resolve_upcycled_architecture(
    model_args: ModelArgs, checkpoint: CheckpointInfo, vocab_size: int | None, granularity: int
) -> GPTModelConfig:
    """--moe-use-upcycling: the mixture of experts that the dense ``checkpoint`` starts; the
    flags other than the mixture's must agree with the checkpoint (:func:`resolve_architecture`)."""
    where = f"the checkpoint {checkpoint.flag} {checkpoint.path}"
    moe = upcycled_architecture(checkpoint.model, model_args, granularity, where)
    resolve_architecture(
        dense_flags(model_args, checkpoint.model, granularity), checkpoint, vocab_size
    )
    return moe


def check_tokenizer(checkpoint: CheckpointInfo, tokenizer, tokenizer_type: str, flag: str) -> None:
    """A tokenizer given by flags must be the checkpoint's (same type: same model file hash)."""
    from megatron_slm.data.tokenizer import vocab_flag_of_record

    recorded = checkpoint.tokenizer
    if not recorded or tokenizer is None:
        return
    where = f"the checkpoint {checkpoint.flag} {checkpoint.path}"
    if tokenizer.vocab_size != recorded.get("vocab_size", tokenizer.vocab_size):
        what = recorded.get("model")
        if tokenizer_type == "NullTokenizer" == recorded.get("type"):  # the flag's meaning
            what = f"a NullTokenizer's --vocab-size {vocab_flag_of_record(recorded)}, then its EOD"
        raise CheckpointError(
            f"{flag}: the tokenizer has {tokenizer.vocab_size} ids, {where} recorded "
            f"{recorded['vocab_size']} ({what})"
        )
    sha, theirs = tokenizer.unique_identifiers.get("sha256"), recorded.get("sha256")
    if tokenizer_type == recorded.get("type") and sha and theirs and sha != theirs:
        raise CheckpointError(
            f"{flag}: tokenizer model sha256 {sha} differs from {where}'s "
            f"{theirs} ({recorded.get('model')}): not the tokenizer the model was trained with"
        )
    options = recorded.get("tiktoken")
    if tokenizer_type == recorded.get("type") == "TikTokenizer" and options:
        for name, value in tokenizer.options().items():
            if value != options.get(name):
                raise CheckpointError(
                    f"{flag}: the TikTokenizer's {name} {value} differs from {where}'s "
                    f"{options.get(name)}: not the ids the model was trained with"
                )


def check_recorded_tokenizer(
    checkpoint: CheckpointInfo, path: str | None = None, merge_file: str | None = None
) -> None:
    """The tokenizer model file the checkpoint names (or ``path``, a copy of it such as the one
    beside a moved checkpoint; a GPT2BPETokenizer's vocab file, with ``merge_file``) must still
    hash to the recorded ``sha256``: a file replaced since training is refused, naming both
    digests. Records without a hash (older checkpoints) and files that do not exist (nothing
    will read them) are not checked."""
    from megatron_slm.data.tokenizer import model_digest

    recorded = checkpoint.tokenizer or {}
    theirs, path = recorded.get("sha256"), path or recorded.get("model")
    merge_file = merge_file or recorded.get("merge_file")
    if not theirs or not path:
        return
    mine = model_digest(recorded.get("type"), path, merge_file)
    flags = "--tokenizer-model"
    if recorded.get("type") == "GPT2BPETokenizer":
        path, flags = f"{path} + {merge_file}", "--vocab-file/--merge-file"
    if mine is not None and mine != theirs:
        raise TokenizerError(
            f"{path}: tokenizer sha256 {mine} differs from the {theirs} recorded in the checkpoint "
            f"{checkpoint.flag} {checkpoint.path}: not the tokenizer the model was trained with "
            f"(restore the file, or give the model's tokenizer with {flags})"
        )


def resolve_tokenizer(args, checkpoint: CheckpointInfo | None, required: bool = True):
    """The tokenizer from ``TokenizerArgs`` flags, else the checkpoint's record; checked against
    the checkpoint. Returns ``(tokenizer or None, type, model path)`` (a GPT2BPETokenizer's model
    path is its vocab file); None only when neither the flags nor the checkpoint name one and
    ``required`` is False."""
    from megatron_slm.data.tokenizer import (
        TIKTOKEN_FLAGS,
        build_tokenizer,
        check_trust_remote_code,
        model_path_of,
        vocab_flag_of_record,
    )

    recorded = (checkpoint.tokenizer if checkpoint else None) or {}
    names = ("tokenizer_model", "vocab_file", "merge_file", "tokenizer_type", "vocab_size",
             *TIKTOKEN_FLAGS)  # fmt: skip
    given = [name for name in names if getattr(args, name, None) is not None]
    merge = None
    if given:
        # GPT-2 BPE files name their type (over the recorded one: never silently ignored).
        gpt2 = "GPT2BPETokenizer" if args.vocab_file or args.merge_file else None
        null = "NullTokenizer" if args.vocab_size and not args.tokenizer_model else None
        ttype = args.tokenizer_type or gpt2 or recorded.get("type") or null
        ttype = ttype or "SentencePieceTokenizer"
        model = model_path_of(ttype, args.tokenizer_model, args.vocab_file)
        vocab, merge = args.vocab_size, args.merge_file
        if ttype == recorded.get("type"):
            model = model or recorded.get("model")
            vocab = vocab or vocab_flag_of_record(recorded)
            merge = merge or recorded.get("merge_file")
        flag = f"--{given[0].replace('_', '-')}"
    elif recorded:
        ttype, model = recorded["type"], recorded.get("model")
        vocab, merge = vocab_flag_of_record(recorded), recorded.get("merge_file")
        flag = f"the tokenizer recorded in {checkpoint.flag} {checkpoint.path}"
    elif required:
        raise CheckpointError(
            "no tokenizer: pass --tokenizer-type/--tokenizer-model"
            + ("" if checkpoint is None else f" (the checkpoint {checkpoint.path} records none)")
        )
    else:
        return None, None, None
    if ttype == "GPT2BPETokenizer" and not (model and merge):
        raise CheckpointError(
            "--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file"
        )
    if ttype != "NullTokenizer" and not model:
        raise CheckpointError(f"--tokenizer-type {ttype} needs --tokenizer-model")
    if (
        checkpoint is not None
        and ttype == recorded.get("type")
        and (model, merge) == (recorded.get("model"), recorded.get("merge_file"))
    ):
        check_recorded_tokenizer(checkpoint)  # the recorded files, whoever named them
    tiktoken = dict(recorded.get("tiktoken") or {}) if ttype == recorded.get("type") else {}
    if hasattr(args, "tiktoken_options"):
        tiktoken.update(args.tiktoken_options())
    trust_remote_code = getattr(args, "trust_remote_code", False)
    check_trust_remote_code(trust_remote_code, ttype)  # (the type may be the record's)
    try:
        tokenizer = build_tokenizer(ttype, model, vocab, merge, tiktoken, trust_remote_code)
    except (OSError, ValueError, RuntimeError) as e:
        what = f"{model} + {merge}" if merge else model or ""
        raise TokenizerError(f"{flag}: cannot load the {ttype} {what}: {e}") from None
    if checkpoint is not None and given:
        check_tokenizer(checkpoint, tokenizer, ttype, flag)
    return tokenizer, ttype, model
