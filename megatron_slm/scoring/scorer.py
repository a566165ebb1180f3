"""Offline reference scoring: one reference loss per token of a token dataset, into its sidecar.

``score_corpus(ScoreConfig(...))`` is the library behind ``tools/score_corpus.py`` (the entry point
initialises the process groups). For each ``--data-prefix P`` it writes the sidecar
``P_refloss.bin/.json`` (``megatron_slm.data.sidecar``): the value at position ``i`` of a document
is the reference model's cross entropy of token ``i`` given the tokens before it in that document
(NaN at position 0).

Work decomposition
------------------
Documents are cut into *chunks* of ``--commit-interval`` consecutive documents. A chunk is the unit
of packing (:mod:`.packing`), of work assignment and of commit: chunk ``c`` is packed into rows the
same way in every run, so a document's values never depend on where a run started or on the
data-parallel size. Each round, data-parallel rank ``d`` scores the ``d``-th not yet written chunk
of the round; all ranks of its model-parallel group (TP, PP) score the same chunk. The writer rank
of the group (TP rank 0 of the last pipeline stage) writes the chunk's values with
``SidecarWriter.write_range`` (data fsync'd, then the range recorded).

Resume: the recorded ranges of the partial sidecar are the one truth about what was written; a
rerun scores the missing chunks and publishes a sidecar byte-identical to an uninterrupted run's.
The sidecar metadata records the settings that influence the values (sequence length, stride,
micro-batch size, commit interval, TP/PP sizes, parameter dtype), so a rerun with other settings is
refused instead of mixing values. One writer per output: global rank 0 holds an exclusive lock on
``P_refloss.lock`` for the whole job (``megatron_slm.output_lock``).

The model is loaded and run by the shared runtime (``megatron_slm.runtime``) in the checkpoint's
recorded ``params_dtype`` (bfloat16 for a model trained so; ``--fp32`` forces float32): fused
per-token losses at any TP, megatron-core's forward-only pipeline schedule with PP > 1.

The loop is a pipeline (:mod:`.pipeline`): a prefetch thread checks and packs the next rounds into
pinned host buffers (:mod:`.chunks`), the main thread only launches copies, forwards and losses
and never reads a device value, and a host-worker thread waits for each batch's asynchronous
device-to-host copy, scatters the losses and writes the chunk. The per-round statistics
all-reduce (one collective per round) runs one round late, so the device always has work queued.
The ``range`` crash point fires on rank 0's host worker after its round's ``write_range``,
``commit`` after a round's statistics came back from every rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from megatron_slm.crash_points import CrashPoints
from megatron_slm.launch import broadcast_from_rank0, raise_on_every_rank
from megatron_slm.progress import ProgressBar, hms
from megatron_slm.scoring.chunks import ChunkLayout, check_ids, chunk_bounds, prepare_chunk
from megatron_slm.scoring.config import ScoreConfig, ScoringError
from megatron_slm.scoring.inputs import ScoringInputs, resolve_inputs
from megatron_slm.scoring.pipeline import Prefetcher, ScoringPipeline

logger = logging.getLogger("megatron_slm")

KILL_HOOK_ENV = "MEGATRON_SLM_SCORE_KILL_AT"
"""Test hook: ``<point>:<k>`` makes global rank 0 SIGKILL itself at the k-th (1-based) occurrence
of ``point``: ``range`` (a round's values written by rank 0), ``commit`` (a round finished on every
rank), ``finalize`` (all rounds done, before publication)."""


@dataclass
class ScoreReport:
    """What one data prefix's scoring did."""

    data_prefix: str
    sidecar_prefix: str
    published: bool
    documents: int
    """Documents scored by this run (all ranks)."""
    tokens: int
    """Tokens of those documents."""
    seconds: float
    tokens_per_second: float
    mean_ref_loss: float
    """Mean of the stored values of the published sidecar (NaN excluded); of this run's values
    when not published."""
    documents_total: int = 0
    tokens_total: int = 0
    estimated_seconds: float | None = None
    """--dry-run: estimated time to score every remaining document with this layout."""
    first_round_seconds: float | None = None
    """--dry-run: the first round's time (its chunk packed before any forward, the warm-up)."""
    steady_tokens_per_second: float | None = None
    """--dry-run with two rounds: the second round's rate, at which the estimate times the rest."""

    def format(self) -> str:
        head = "dry run" if self.estimated_seconds is not None else "scored"
        lines = [
            f"{head} {self.data_prefix}: {self.documents} documents, {self.tokens} tokens in "
            f"{self.seconds:.1f} s ({self.tokens_per_second:,.0f} tokens/s), mean reference loss "
            f"{self.mean_ref_loss:.4f}"
        ]
        if self.estimated_seconds is not None:
            basis = ""
            if self.steady_tokens_per_second is not None:
                basis = (
                    f" (first round {self.first_round_seconds:.1f} s with packing and warm-up, "
                    f"then {self.steady_tokens_per_second:,.0f} tokens/s)"
                )
            lines.append(
                f"  estimate for the remaining corpus ({self.documents_total} documents, "
                f"{self.tokens_total} tokens): {hms(self.estimated_seconds)}{basis}"
            )
        elif self.published:
            lines.append(f"  sidecar published: {self.sidecar_prefix}.bin / .json")
        else:
            lines.append(f"  sidecar not published (partial state kept in {self.sidecar_prefix}.*)")
        return "\n".join(lines)


def _open_output(prefix: str, config: ScoreConfig, inputs: ScoringInputs, settings: dict):
    """Rank 0 opens, resumes or (``--overwrite``) recreates the partial sidecar. Returns the
    writer, or raises ScoringError."""
    from megatron_slm.data.sidecar import SidecarError, SidecarWriter, sidecar_exists

    if sidecar_exists(prefix) and not config.overwrite:
        raise ScoringError(
            f"--data-prefix {prefix}: the sidecar {prefix}_refloss.json already exists; "
            f"pass --overwrite to replace it"
        )
    kwargs = dict(
        dtype=config.dtype,
        reference=inputs.reference,
        settings=settings,
        overwrite=config.overwrite,
    )
    try:
        return SidecarWriter.open_or_resume(prefix, **kwargs)
    except (SidecarError, FileExistsError) as e:
        if not config.overwrite:
            raise ScoringError(str(e)) from None
        return SidecarWriter(prefix, **kwargs)  # discards the mismatched partial state


def _prepare_output(prefix, config, inputs, settings, is_rank0, device):
    """Rank 0's writer (None on other ranks and in a dry run); every rank gets the same verdict."""
    error, writer = None, None
    if is_rank0 and not config.dry_run:
        try:
            writer = _open_output(prefix, config, inputs, settings)
        except ScoringError as e:
            error = str(e)
    raise_on_every_rank(error, ScoringError)
    return writer


def _open_writer_rank(prefix, config, inputs, settings):
    from megatron_slm.data.sidecar import SidecarWriter

    return SidecarWriter.open_or_resume(
        prefix,
        dtype=config.dtype,
        reference=inputs.reference,
        settings=settings,
        overwrite=config.overwrite,
    )


def _chunks_todo(writer, n_docs: int, interval: int, limit: int) -> list[int]:
    """Chunk ids whose documents are not all recorded as written (documents < limit)."""
    done = np.zeros(n_docs, dtype=bool)
    if writer is not None:
        for a, b in writer.completed_ranges():
            done[a:b] = True
    todo = []
    for c in range(-(-limit // interval)):
        a, b = c * interval, min((c + 1) * interval, n_docs)
        if not done[a:b].all():
            todo.append(c)
    return todo


def _token_memmap(prefix: str, dataset) -> np.ndarray:
    """All token ids ``[n_tokens]`` of the dataset, memory-mapped (documents back to back, as
    megatron-core's builder writes them; checked against the index's pointers)."""
    from megatron_slm.data.indexed import get_bin_path

    index = dataset.index
    dtype = np.dtype(index.dtype)
    pointers = np.asarray(index.sequence_pointers, dtype=np.int64)
    lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
    if len(pointers) and not np.array_equal(
        pointers, np.concatenate([[0], np.cumsum(lengths)[:-1]]) * dtype.itemsize
    ):
        raise ScoringError(f"--data-prefix {prefix}: documents are not stored back to back")
    if not lengths.sum():
        return np.zeros(0, dtype=dtype)
    return np.memmap(get_bin_path(prefix), dtype=dtype, mode="r")


def _mean_of_sidecar(prefix: str) -> float:
    from megatron_slm.data.sidecar import SidecarReader, decode_values

    reader = SidecarReader(prefix)
    total, count = 0.0, 0
    step = 1 << 24
    values = reader.values
    for lo in range(0, reader.num_tokens, step):
        v = decode_values(np.asarray(values[lo : lo + step]), reader.dtype).astype(np.float64)
        ok = np.isfinite(v)
        total += float(v[ok].sum())
        count += int(ok.sum())
    return total / count if count else float("nan")


def dry_run_estimate(
    marks: list[tuple[float, int]], remaining_tokens: int
) -> tuple[float, float | None]:
    """(seconds to score ``remaining_tokens``, the steady rate or None) from a dry run's rounds.

    ``marks[r]`` = (seconds from the start, tokens scored so far) once round ``r`` had finished
    on the device and been counted (``ScoringPipeline.flush``). The first round carries what no
    later round repeats: its chunk is packed before any forward, and the device warms up. A later
    round's chunk was packed while the one before it ran, which is how the rest of the corpus
    runs, so the rest is timed at that rate (cpu, tiny model: a one-chunk run's rate was 0.7x the
    steady one). With one round, all of it is timed at that round's rate.
    """
    first_s, first_tokens = marks[0]
    last_s, last_tokens = marks[-1]
    if last_tokens <= first_tokens or last_s <= first_s or remaining_tokens <= first_tokens:
        return (remaining_tokens * first_s / first_tokens if first_tokens else 0.0), None
    steady = (last_tokens - first_tokens) / (last_s - first_s)
    return first_s + (remaining_tokens - first_tokens) / steady, steady


def _mean_text(loss_sum: float, count: int) -> str:
    return f"mean ref loss {loss_sum / count if count else float('nan'):.4f}"


def score_dataset(prefix: str, config: ScoreConfig, inputs: ScoringInputs, lm) -> ScoreReport:
    """Score one token dataset (collective over all ranks)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    device = lm.device
    rank = dist.get_rank()
    is_rank0 = rank == 0
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    is_writer = lm.is_last_stage and parallel_state.get_tensor_model_parallel_rank() == 0
    settings = inputs.settings(config)

    dataset = IndexedDataset(prefix)
    lengths = np.array(dataset.sequence_lengths, dtype=np.int64)  # [n_docs]
    n_docs = len(lengths)
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    limit = min(n_docs, config.max_docs) if config.max_docs else n_docs
    interval = config.commit_interval

    writer = _prepare_output(prefix, config, inputs, settings, is_rank0, device)
    dist.barrier()
    if is_writer and not config.dry_run and writer is None:
        writer = _open_writer_rank(prefix, config, inputs, settings)
    todo = broadcast_from_rank0(_chunks_todo(writer, n_docs, interval, limit) if is_rank0 else None)
    bounds = {c: chunk_bounds(c, interval, n_docs) for c in todo}  # [first, end) documents
    remaining_docs = sum(end - first for first, end in bounds.values())
    remaining_tokens = sum(int(offsets[end] - offsets[first]) for first, end in bounds.values())
    if config.dry_run:
        todo = todo[: 2 * dp]  # two rounds: the second one runs at the steady rate
    tokens_mmap = _token_memmap(prefix, dataset)  # [total tokens] (our datasets are contiguous)
    todo_tokens = sum(int(offsets[bounds[c][1]] - offsets[bounds[c][0]]) for c in todo)
    bar = ProgressBar(f"score {os.path.basename(prefix)}", todo_tokens, "tokens", is_rank0)
    layout = ChunkLayout(
        seq_length=inputs.seq_length,
        stride=inputs.stride,
        micro_batch_size=config.micro_batch_size,
        packing=config.packing_mode,
        pipeline_parallel=config.pipeline_model_parallel_size,
        pin=device.type == "cuda",
    )

    def prepare_round(r: int):
        """This rank's chunk of round ``r`` (prefetch thread). Every rank checks every chunk of
        the round, so a bad id fails all ranks at the same round."""
        round_chunks = todo[r * dp : (r + 1) * dp]
        for c in round_chunks:
            check_ids(prefix, tokens_mmap, offsets, *bounds[c], inputs.vocab_limit)
        if dp_rank >= len(round_chunks):
            return None
        return prepare_chunk(tokens_mmap, offsets, *bounds[round_chunks[dp_rank]], layout)

    def write(chunk) -> None:
        writer.write_range(chunk.first_doc, chunk.document_values())

    def progress(t) -> None:
        bar.update(t.tokens, _mean_text(t.loss_sum, t.loss_count))

    pipeline = ScoringPipeline(
        lm,
        is_writer=is_writer,
        write=write if is_writer and writer is not None else None,
        on_round=progress,
        crash=CrashPoints(KILL_HOOK_ENV) if is_rank0 else None,
    )
    n_rounds = -(-len(todo) // dp)
    start = time.perf_counter()
    prefetch = Prefetcher(prepare_round, n_rounds)
    round_marks: list[tuple[float, int]] = []  # dry run: (seconds, tokens so far) per round
    try:
        for _ in range(n_rounds):
            pipeline.run_round(prefetch.get())
            if config.dry_run:
                # Each round timed to its end (statistics reduce one round late in the job, so
                # without the wait the first round's end would include the second's forwards).
                pipeline.flush()
                round_marks.append((time.perf_counter() - start, pipeline.totals.tokens))
        totals = pipeline.close()
    finally:
        prefetch.close()
        pipeline.abort()
    seconds = time.perf_counter() - start
    run_docs, run_tokens = totals.documents, totals.tokens
    loss_sum, loss_count = totals.loss_sum, totals.loss_count
    bar.update(run_tokens, _mean_text(loss_sum, loss_count), final=True)
    rate = run_tokens / seconds if seconds > 0 else 0.0

    published = False
    mean = loss_sum / loss_count if loss_count else float("nan")
    total_docs_left = total_tokens_left = 0
    estimate = steady = first_round = None
    if config.dry_run:
        total_docs_left, total_tokens_left = remaining_docs, remaining_tokens
        if round_marks:
            estimate, steady = dry_run_estimate(round_marks, remaining_tokens)
            first_round = round_marks[0][0]
        else:
            estimate = 0.0
    elif limit == n_docs:
        dist.barrier()
        error = None
        if is_rank0:
            CrashPoints(KILL_HOOK_ENV).reached("finalize")
            try:
                writer.finalize()
            except Exception as e:  # noqa: BLE001 - reported on every rank
                error = f"cannot publish the sidecar of {prefix}: {e}"
        raise_on_every_rank(error, ScoringError)
        published = True
        mean = _mean_of_sidecar(prefix)
    if writer is not None and not published:
        writer.close()
    from megatron_slm.data.sidecar import sidecar_prefix

    return ScoreReport(
        data_prefix=prefix,
        sidecar_prefix=sidecar_prefix(prefix),
        published=published,
        documents=run_docs,
        tokens=run_tokens,
        seconds=seconds,
        tokens_per_second=rate,
        mean_ref_loss=mean,
        documents_total=total_docs_left,
        tokens_total=total_tokens_left,
        estimated_seconds=estimate,
        first_round_seconds=first_round,
        steady_tokens_per_second=steady,
    )


def _output_lock(prefix: str, config: ScoreConfig, is_rank0: bool):
    """Rank 0 holds ``<sidecar prefix>.lock`` while the job runs: a second job on the same prefix
    fails at once naming the holder; a killed holder's lock is released by the kernel."""
    if config.dry_run or not is_rank0:
        return contextlib.nullcontext()
    from megatron_slm.data.sidecar import sidecar_prefix
    from megatron_slm.output_lock import OutputLock

    return OutputLock(sidecar_prefix(prefix) + ".lock", f"the sidecar of {prefix}")


def score_corpus(config: ScoreConfig) -> list[ScoreReport]:
    """Score every ``config.data_prefix`` with the reference model ``config.load``.

    Collective: call on every rank after ``launch.initialize`` with the config's TP/PP sizes."""
    import torch.distributed as dist

    from megatron_slm.runtime import job_device, load_model

    inputs = resolve_inputs(config)
    device = job_device(config, ScoringError)
    if not inputs.tokenizer:
        logger.info("no tokenizer given or recorded: checking ids against the model vocabulary")
    is_rank0 = dist.get_rank() == 0
    reports = []
    with contextlib.ExitStack() as locks:
        # Every output is locked before the model is loaded: a second job fails at once.
        error = None
        try:
            for prefix in config.data_prefix:
                locks.enter_context(_output_lock(prefix, config, is_rank0))
        except ValueError as e:
            error = str(e)
        raise_on_every_rank(error, ScoringError)
        try:
            lm = load_model(
                inputs.plan,
                device,
                params_dtype=inputs.params_dtype,
                documents=config.documents_flag,
            )
        except ValueError as e:
            raise ScoringError(str(e)) from None
        for prefix in config.data_prefix:
            report = score_dataset(prefix, config, inputs, lm)
            if is_rank0:
                print(report.format(), flush=True)
            reports.append(report)
    return reports
