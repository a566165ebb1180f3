"""Tokenizer, datasets and the resumable micro-batch iterator of the trainer."""

from __future__ import annotations

import logging
import signal
from functools import partial

import torch
from megatron.core import parallel_state
from torch.utils.data import DataLoader

from megatron_slm.data import build_gpt_datasets
from megatron_slm.errors import ConfigError
from megatron_slm.training.config import DerivedSizes, PretrainConfig

logger = logging.getLogger("megatron_slm")


def build_datasets(
    cfg: PretrainConfig, sizes: DerivedSizes, tokenizer, require_sidecar: bool, batch_list=None
):
    """(train, valid, test); with ``batch_list`` (``--train-samples-from``) train is its
    batches of the source order (``training.rounds``); with --multiple-validation-sets and
    several validation datasets, valid is their list."""
    t = cfg.training
    evals = (sizes.train_iters // t.eval_interval + 1) * t.eval_iters if t.eval_interval else 0
    if t.skip_train:  # (one evaluation, at the loaded step)
        evals = max(evals, t.eval_iters)
    num_samples = [
        sizes.train_samples,
        None if t.full_validation else evals * sizes.global_batch_size,  # (None: one epoch)
        t.eval_iters * sizes.global_batch_size,
    ]
    if batch_list is not None:  # train = the source order the list was drawn from
        num_samples[0] = batch_list.source["num_samples"]
    d = cfg.data
    datasets = build_gpt_datasets(
        None if d.per_split else d.data_path,
        d.split,
        t.seq_length,
        t.seed,
        num_samples,
        tokenizer,
        data_cache_path=d.data_cache_path,
        mmap_bin_files=d.mmap_bin_files,
        num_dataset_builder_threads=d.num_dataset_builder_threads,
        require_sidecar=require_sidecar,
        blend_per_split=d.blend_per_split(),
        multiple_validation_sets=d.multiple_validation_sets,
        full_validation=t.full_validation,
        mock=d.mock_data,
        fim=d.fim_settings(tokenizer) if d.fim_data else None,
        **d.eod_flags,
    )
    if batch_list is None:
        return datasets
    from megatron_slm.training.rounds import wrap_train_dataset

    return (wrap_train_dataset(batch_list, datasets[0]), *datasets[1:])


def build_sft_dataset(cfg: PretrainConfig, sizes: DerivedSizes, tokenizer):
    """Packed SFT rows (data/sft.py); no validation split (hold data out in its own file)."""
    from megatron_slm.data.sft import SFTDataset

    need = sizes.train_samples
    ds = SFTDataset(
        tokenizer,
        cfg.sft.sft_data,
        cfg.training.seq_length,
        cfg.training.seed,
        need,
        epochs=cfg.sft.sft_epochs,
        too_long=cfg.sft.sft_too_long,
    )
    if len(ds) < need:
        gbs = sizes.global_batch_size
        length = f"--train-iters {sizes.train_iters} x --global-batch-size {gbs}"
        if sizes.batch_schedule is not None:
            length = f"{sizes.train_iters} steps of a growing global batch"
        raise ConfigError(
            f"{length} needs {need} packed sequences; --sft-epochs {cfg.sft.sft_epochs} gives "
            f"{len(ds)}"
        )
    return ds


# Sample keys a micro-batch carries: segment_ids for packed SFT rows, dataset_id for blends.
BATCH_KEYS = (
    "tokens",
    "labels",
    "loss_mask",
    "position_ids",
    "ref_loss",
    "segment_ids",
    "dataset_id",
)


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack the samples' :data:`BATCH_KEYS` into ``[b, ...]`` tensors (in the loader's workers)."""
    return {
        k: torch.stack([torch.as_tensor(s[k]) for s in samples])
        for k in samples[0]
        if k in BATCH_KEYS
    }


def _ignore_signals(signums: tuple[int, ...], _worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the trainer's exit signal is for the trainer. SLURM signals
    every process of a job step (``scancel --signal``, pre-emption); a worker killed by it makes
    the DataLoader raise in the trainer instead of letting it save and exit, and a forked worker
    that inherited the trainer's handler would report the signal as its own. Ignoring workers
    still stop with the trainer (its shutdown, or their watchdog if it dies)."""
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)


class _RankBatches:
    """Batch sampler: this DP rank's micro-batch index lists from ``consumed`` on (see
    :class:`MicroBatches`), up to the last whole micro-batch of a dataset of ``size`` samples."""

    def __init__(self, consumed: int, size: int, mbs: int, dp: int, dp_rank: int):
        self.consumed, self.size, self.mbs, self.dp, self.dp_rank = consumed, size, mbs, dp, dp_rank

    def __iter__(self):
        consumed = self.consumed
        while (start := consumed + self.dp_rank * self.mbs) + self.mbs <= self.size:
            yield list(range(start, start + self.mbs))
            consumed += self.mbs * self.dp


class MicroBatches:
    """Micro-batches of this data-parallel rank, resumable from a consumed-sample count.

    Megatron-LM's order: the global batch is cut into chunks of ``micro_batch_size x dp``
    consecutive samples; DP rank r takes the r-th ``micro_batch_size`` slice of each chunk.

    Samples are read and stacked by a ``torch.utils.data.DataLoader`` with ``num_workers``
    processes (``--num-workers``; 0: on the calling thread) that read ahead of the step, into
    pinned memory with ``pin_memory`` (CUDA), as Megatron-LM does, so the host never waits for
    data and the trainer's ``.to(device, non_blocking=True)`` copies are asynchronous.
    ``consumed_samples`` and ``read`` count the micro-batches handed out, not those read ahead,
    so a checkpoint resumes at the first sample not trained on. Workers ignore
    ``ignored_signals`` (the trainer's ``--exit-signal``).

    :meth:`rewind` starts again from the first micro-batch with the same worker processes (the
    validation batches of every evaluation): forking new workers from the trainer, whose
    collective backends and pin-memory threads run meanwhile, can deadlock a child in CPython's
    after-fork cleanup (a thread held the interpreter's thread-list lock at the fork), which
    hung a validation loader on the CPU.
    """

    def __init__(
        self,
        dataset,
        micro_batch_size: int,
        consumed_samples: int = 0,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        ignored_signals: tuple[int, ...] = (),
    ):
        self.dataset = dataset
        self.mbs = micro_batch_size
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.consumed_samples = consumed_samples
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.ignored_signals = tuple(ignored_signals)
        self.read: list[int] | None = None  # dataset indices read, when recorded (rounds.py)
        self._first = consumed_samples
        self._loader = None  # built at the first micro-batch
        self._batches = None  # the loader's iterator

    def __iter__(self):
        return self

    def _start(self):
        if self._loader is None:
            self._loader = self._build_loader()
        return iter(self._loader)  # persistent workers: the same processes, sampler restarted

    def _build_loader(self) -> DataLoader:
        sampler = _RankBatches(self._first, len(self.dataset), self.mbs, self.dp, self.dp_rank)
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            # Its own generator: starting the loader draws a worker seed from it, not from the
            # global RNG (the samples are functions of their index; nothing else is random).
            generator=torch.Generator(),
            prefetch_factor=2 if self.num_workers else None,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=partial(_ignore_signals, self.ignored_signals),
        )

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._batches is None:
            self._batches = self._start()
        batch = next(self._batches)  # StopIteration after the last whole micro-batch
        start = self.consumed_samples + self.dp_rank * self.mbs
        if self.read is not None:
            self.read.extend(range(start, start + self.mbs))
        self.consumed_samples += self.mbs * self.dp
        return batch

    def rewind(self) -> None:
        """Start again from the first micro-batch, on the same worker processes."""
        self.consumed_samples = self._first
        if self.read is not None:
            self.read.clear()
        self._batches = None if self._loader is None else iter(self._loader)

    def close(self) -> None:
        """Stop the loader's workers (they also stop when this object is collected); a later
        micro-batch starts a new loader where this one stopped."""
        self._loader = self._batches = None
        self._first = self.consumed_samples
