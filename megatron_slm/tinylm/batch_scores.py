"""The loss of every training sample and batch under a frozen model, in the trainer's order.

``score_batches(ScoreBatchesConfig)`` is the library behind ``tools/score_batches.py`` (the entry
point initialises the process groups). The sample order is the trainer's own
(``data.sample_list.build_source_dataset``: megatron-core's ``GPTDataset`` for the blend, split,
seed, sequence length and train samples); batch ``b`` is samples ``b*G .. b*G + G - 1``. Each
sample is forwarded as the trainer feeds it (``tokens``, ``labels``, ``position_ids``, plain causal
attention, or each document to itself with --reset-attention-mask) through the shared runtime
(fused per-token losses at any TP, megatron-core's forward-only pipeline schedule with PP > 1);
its loss is the mean over its ``loss_mask`` (--eod-mask-loss: without the token after each
end-of-document token).

Work decomposition and resume follow the offline scorer: *chunks* of ``--commit-interval`` batches
are forwarded the same way in every run (the same micro-batches), so values do not depend on the
data-parallel size or on where a run restarted. Each round, DP rank ``d`` scores the ``d``-th
missing chunk; global rank 0 gathers the round's values, writes them (fsync, then a range marker)
and finally publishes ``P.bin`` and then ``P.json``. A rerun after a crash scores only missing
chunks and publishes the same bytes. Rank 0 holds ``P.lock`` for the whole job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from megatron_slm.crash_points import CrashPoints
from megatron_slm.data.sample_list import (
    RECORD,
    BatchLossesWriter,
    SampleListError,
    build_source_dataset,
    losses_paths,
    source_settings,
)
from megatron_slm.launch import broadcast_from_rank0, raise_on_every_rank
from megatron_slm.models.document_mask import DocumentMask
from megatron_slm.progress import ProgressBar
from megatron_slm.runtime import per_token_losses
from megatron_slm.runtime.forward import Rows
from megatron_slm.tinylm.rounds_config import ScoreBatchesConfig

logger = logging.getLogger("megatron_slm")

KILL_HOOK_ENV = "MEGATRON_SLM_SCORE_BATCHES_KILL_AT"
"""Test hook: ``<point>:<k>`` SIGKILLs global rank 0 at the k-th ``commit`` (a round written) or
at ``finalize`` (before publication)."""


@dataclass
class ScoreBatchesReport:
    output: str
    batches: int
    samples: int
    scored_samples: int
    """Samples scored by this run (the rest were written by an earlier, interrupted run)."""
    seconds: float
    tokens_per_second: float
    mean_loss: float

    def format(self) -> str:
        return (
            f"scored {self.scored_samples} of {self.samples} samples ({self.batches} batches) in "
            f"{self.seconds:.1f} s ({self.tokens_per_second:,.0f} tokens/s), mean loss "
            f"{self.mean_loss:.4f}\n  published: {self.output}"
        )


def _chunk_records(lm, dataset, first: int, end: int, mbs: int, eod=None) -> np.ndarray | None:
    """``[end - first]`` RECORDs of samples ``first..end-1`` (None off the last stage); with
    ``eod`` (--reset-attention-mask) each document attends only to itself."""
    batches, masks = [], []
    for a in range(first, end, mbs):
        samples = [dataset[i] for i in range(a, a + mbs)]
        stack = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}
        tokens = stack["tokens"]
        documents = None if eod is None else DocumentMask.from_tokens(tokens, eod)
        batches.append(Rows(tokens, stack["labels"], stack["position_ids"], documents))
        masks.append(stack["loss_mask"].float())  # [b, s]
    losses = per_token_losses(lm, batches)  # [b, s] each, last stage only
    if not losses:
        return None
    out = np.zeros(end - first, dtype=RECORD)
    row = 0
    for loss, mask in zip(losses, masks):
        loss = loss.float().cpu()
        n = mask.sum(1)  # [b]
        mean = (loss * mask).sum(1) / n.clamp(min=1)
        out["loss"][row : row + len(n)] = mean.numpy()
        out["tokens"][row : row + len(n)] = n.to(torch.int32).numpy()
        row += len(n)
    return out


def score_batches(config: ScoreBatchesConfig) -> ScoreBatchesReport | None:
    """Collective: call on every rank after ``launch.initialize`` with the config's TP/PP.
    Returns the report on global rank 0 (None elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_slm.output_lock import OutputLock
    from megatron_slm.runtime import job_device, load_model, plan_load

    device = job_device(config, SampleListError)
    is_rank0 = dist.get_rank() == 0
    dp, dp_rank = (
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_rank(),
    )
    is_writer = parallel_state.is_pipeline_last_stage() and (
        parallel_state.get_tensor_model_parallel_rank() == 0
    )
    _, json_path = losses_paths(config.output)
    lock = contextlib.nullcontext()
    if is_rank0:
        lock = OutputLock(json_path.removesuffix(".json") + ".lock", f"--output {json_path}")
    with contextlib.ExitStack() as stack:
        error = None
        try:
            stack.enter_context(lock)
        except ValueError as e:
            error = str(e)
        raise_on_every_rank(error, SampleListError)
        try:
            lm = load_model(
                plan_load(config, tokenizer="required"),
                device,
                params_dtype=torch.bfloat16 if config.bf16 else torch.float32,
                documents="--reset-attention-mask" if config.reset_attention_mask else None,
            )
        except ValueError as e:
            raise SampleListError(str(e)) from None
        source = source_settings(
            config.data_path,
            config.split,
            config.seq_length,
            config.seed,
            config.num_samples,
            config.global_batch_size,
        )
        dataset, n_batches = build_source_dataset(
            config.data_path,
            source,
            lm.tokenizer,
            config.data_cache_path,
            eod_mask_loss=config.eod_mask_loss,
        )
        if n_batches == 0:
            raise SampleListError(
                f"--global-batch-size {config.global_batch_size}: the train split has fewer "
                "samples than one batch"
            )
        source["batches"] = n_batches
        return _score(config, lm, dataset, source, is_rank0, is_writer, dp, dp_rank)


def _score(config, lm, dataset, source, is_rank0, is_writer, dp, dp_rank):
    import torch.distributed as dist

    g, ci = config.global_batch_size, config.commit_interval
    n_batches = source["batches"]
    n_samples = n_batches * g
    meta = {
        "source": source,
        "model": {"load": lm.source, "arch": dataclasses.asdict(lm.arch)},
        "settings": {
            "micro_batch_size": config.micro_batch_size,
            "commit_interval": ci,
            "tensor_model_parallel_size": config.tensor_model_parallel_size,
            "pipeline_model_parallel_size": config.pipeline_model_parallel_size,
            "params_dtype": "bfloat16" if config.bf16 else "float32",
            "reset_attention_mask": config.reset_attention_mask,
            "eod_mask_loss": config.eod_mask_loss,
        },
    }
    writer, error = None, None
    if is_rank0:
        try:
            writer = BatchLossesWriter(config.output, meta, n_samples, config.overwrite)
        except SampleListError as e:
            error = str(e)
    raise_on_every_rank(error, SampleListError)
    todo = None
    if is_rank0:
        done = np.zeros(n_samples, dtype=bool)
        for a, b in writer.completed_ranges():
            done[a:b] = True
        todo = [
            c for c in range(-(-n_batches // ci)) if not done[c * ci * g : (c + 1) * ci * g].all()
        ]
    todo = broadcast_from_rank0(todo)
    total = sum(min((c + 1) * ci, n_batches) * g - c * ci * g for c in todo)
    bar = ProgressBar(
        f"score batches {os.path.basename(config.output)}", total, "samples", is_rank0
    )
    crash = CrashPoints(KILL_HOOK_ENV)
    eod = lm.tokenizer.eod if config.reset_attention_mask else None  # documents to themselves
    start, scored = time.perf_counter(), 0
    loss_sum = 0.0
    for r in range(-(-len(todo) // dp)):
        round_chunks = todo[r * dp : (r + 1) * dp]
        mine = None
        if dp_rank < len(round_chunks):
            c = round_chunks[dp_rank]
            first, end = c * ci * g, min((c + 1) * ci, n_batches) * g
            records = _chunk_records(lm, dataset, first, end, config.micro_batch_size, eod)
            if is_writer:
                mine = (first, records)
        gathered = [None] * dist.get_world_size() if is_rank0 else None
        dist.gather_object(mine, gathered, dst=0)
        if is_rank0:
            for item in gathered:
                if item is not None:
                    first, records = item
                    writer.write_range(first, records)
                    scored += len(records)
                    loss_sum += float(records["loss"].astype(np.float64).sum())
            crash.reached("commit")
            bar.update(scored, f"mean loss {loss_sum / max(scored, 1):.4f}")
    seconds = time.perf_counter() - start
    dist.barrier()
    error = None
    if is_rank0:
        bar.update(scored, f"mean loss {loss_sum / max(scored, 1):.4f}", final=True)
        crash.reached("finalize")
        try:
            writer.finalize()
        except (SampleListError, OSError) as e:
            error = f"cannot publish {config.output}: {e}"
    raise_on_every_rank(error, SampleListError)
    if not is_rank0:
        return None
    from megatron_slm.data.sample_list import read_batch_losses

    published = read_batch_losses(config.output, "--output")
    return ScoreBatchesReport(
        output=published.path,
        batches=n_batches,
        samples=n_samples,
        scored_samples=scored,
        seconds=seconds,
        tokens_per_second=scored * config.seq_length / seconds if seconds > 0 else 0.0,
        mean_loss=float(published.sample_losses.astype(np.float64).mean()),
    )
