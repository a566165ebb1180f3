"""Tokenizer, datasets and the resumable micro-batch iterator of the trainer."""

from __future__ import annotations

import logging

import torch
from megatron.core import parallel_state

from megatron_slm.data import build_gpt_datasets
from megatron_slm.training.config import DerivedSizes, PretrainConfig

logger = logging.getLogger("megatron_slm")


def build_datasets(cfg: PretrainConfig, sizes: DerivedSizes, tokenizer, require_sidecar: bool):
    t = cfg.training
    evals = (sizes.train_iters // t.eval_interval + 1) * t.eval_iters if t.eval_interval else 0
    num_samples = [
        sizes.train_iters * sizes.global_batch_size,
        evals * sizes.global_batch_size,
        t.eval_iters * sizes.global_batch_size,
    ]
    return build_gpt_datasets(
        cfg.data.data_path,
        cfg.data.split,
        t.seq_length,
        t.seed,
        num_samples,
        tokenizer,
        data_cache_path=cfg.data.data_cache_path,
        require_sidecar=require_sidecar,
    )


def build_sft_dataset(cfg: PretrainConfig, sizes: DerivedSizes, tokenizer):
    """Packed SFT rows (data/sft.py); no validation split (hold data out in its own file)."""
    from megatron_slm.data.sft import SFTDataset

    need = sizes.train_iters * sizes.global_batch_size
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
        raise ValueError(
            f"--train-iters {sizes.train_iters} x --global-batch-size {sizes.global_batch_size} "
            f"needs {need} packed sequences; --sft-epochs {cfg.sft.sft_epochs} gives {len(ds)}"
        )
    return ds


class MicroBatches:
    """Micro-batches of this data-parallel rank, resumable from a consumed-sample count.

    Megatron-LM's order: the global batch is cut into chunks of ``micro_batch_size x dp``
    consecutive samples; DP rank r takes the r-th ``micro_batch_size`` slice of each chunk.
    """

    def __init__(self, dataset, micro_batch_size: int, consumed_samples: int = 0):
        self.dataset = dataset
        self.mbs = micro_batch_size
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.consumed_samples = consumed_samples

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.consumed_samples + self.dp_rank * self.mbs
        if start + self.mbs > len(self.dataset):
            raise StopIteration
        samples = [self.dataset[i] for i in range(start, start + self.mbs)]
        self.consumed_samples += self.mbs * self.dp
        return {
            k: torch.stack([torch.as_tensor(s[k]) for s in samples])
            for k in samples[0]
            if k in ("tokens", "labels", "loss_mask", "position_ids", "ref_loss", "segment_ids")
        }
