"""The offline scorer's loop as a pipeline: the device never waits for the host.

Three threads per rank:

* the **prefetcher** (:class:`Prefetcher`) prepares rounds ahead of the model: id checks, packing,
  batch inputs in pinned memory (:mod:`.chunks`);
* the **main thread** (:meth:`ScoringPipeline.run_round`) only launches work: per batch one
  ``non_blocking`` host-to-device copy, the forward and the fused loss, one ``non_blocking``
  device-to-host copy of the ``[b, s]`` losses (pinned) and a CUDA event. It never reads a device
  value: zero host synchronisations (``tests/unit/scoring/test_pipeline.py`` counts them);
* the **host worker** (one thread, jobs in submission order) waits for each copy's event, scatters
  the kept losses into the chunk's values, writes the chunk (``SidecarWriter.write_range``: data
  fsync'd, then the range recorded) and reads the round statistics back.

One collective per round: the all-reduce of ``[documents, tokens, loss sum, loss count, failed]``.
It runs one round late (round ``r``'s after round ``r + 1``'s batches are launched), so the device
has work queued while the host worker finishes a round. A host-worker failure on one rank travels
in the ``failed`` slot: that rank raises its error right after the collective, every other rank
raises a ScoringError before the next one, so no rank waits for a peer that has left.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass

import numpy as np
import torch

from megatron_slm.crash_points import CrashPoints
from megatron_slm.runtime import per_token_losses
from megatron_slm.runtime.forward import Rows
from megatron_slm.scoring.chunks import PreparedChunk
from megatron_slm.scoring.config import ScoringError
from megatron_slm.scoring.packing import HostBatch

FAILED = 4
"""Slot of the round statistics that counts ranks whose host worker failed."""


class Prefetcher:
    """``make(i)`` for ``i = 0 .. n - 1`` in a background thread, at most ``depth`` items ahead.

    :meth:`get` returns the items in order and re-raises the thread's exception (on the main
    thread, at the item that failed)."""

    def __init__(self, make: Callable[[int], object], n: int, depth: int = 2):
        self._make, self._n = make, n
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="score-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for i in range(self._n):
                if not self._put((True, self._make(i))):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised by get() on the main thread
            self._put((False, e))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self):
        ok, item = self._queue.get()
        if not ok:
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _HostWorker:
    """One thread running jobs in submission order. After the first exception every later job
    fails with it too (a chunk is never written after one of its batches failed)."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="score-writer", daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        self._queue.put((fn, args, fut))
        return fut

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            fn, args, fut = job
            if self.error is not None:
                fut.set_exception(self.error)
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e
                fut.set_exception(e)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class _PeerFailed(Exception):
    """Another rank's host worker failed (flagged in a round's statistics)."""


@dataclass
class Totals:
    """What the rounds reduced so far scored (all ranks)."""

    documents: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0


class ScoringPipeline:
    """The per-rank scoring loop: ``run_round(chunk)`` once per round (``None`` when this rank has
    no chunk in the round: it still takes part in the round's collective), then :meth:`close`.

    Args:
        lm: the loaded reference model (``megatron_slm.runtime``).
        is_writer: this rank's losses are its model-parallel group's copy of the values (TP rank 0
            of the last stage): only it copies them back and calls ``write``.
        write: stores a finished chunk (host worker thread); None writes nothing (dry run).
        on_round: called with the running :class:`Totals` after each round's statistics are read
            back (host worker thread): progress display.
        crash: test crash points (global rank 0): ``range`` after each round's end on this rank,
            ``commit`` after each round's statistics came back (every rank finished the round).
        group: process group of the round collective (default: the world).
    """

    def __init__(
        self,
        lm,
        *,
        is_writer: bool,
        write: Callable[[PreparedChunk], None] | None = None,
        on_round: Callable[[Totals], None] | None = None,
        crash: CrashPoints | None = None,
        group=None,
    ):
        self.lm = lm
        self._group = group
        self.is_writer = is_writer
        self._write = write
        self._on_round = on_round
        self._crash = crash
        self._worker = _HostWorker()
        self._pending: Future | None = None
        self.totals = Totals()

    # -- main thread ------------------------------------------------------------------------------
    def run_round(self, chunk: PreparedChunk | None) -> None:
        """Launch one round's batches; reduce the previous round's statistics."""
        if chunk is not None:
            # Inference mode, not only no_grad: no version counters or view tracking on any
            # tensor, so less host time per op (best of 4 on CPU, tiny model: +2 to +7%). The
            # losses only go to the host, never into autograd.
            with torch.inference_mode():
                for schedule in chunk.schedules:
                    losses = per_token_losses(self.lm, [self._to_device(b) for b in schedule])
                    if self.is_writer:
                        for batch, loss in zip(schedule, losses):
                            self._worker.submit(self._scatter, chunk, batch, *self._to_host(loss))
        if self._pending is not None:
            self._reduce(self._pending)
        self._pending = self._worker.submit(self._end_round, chunk if self.is_writer else None)

    def flush(self) -> None:
        """Wait until every round so far is done on the device, written and counted in
        :attr:`totals` (``--dry-run`` times its rounds so; the job itself never waits here).
        A failure surfaces here as in :meth:`run_round`, or at :meth:`close`."""
        self._reduce_pending()
        wait([self._worker.submit(lambda: None)])  # runs after the round's accounting

    def close(self) -> Totals:
        """Reduce the last round, wait for every write; the totals of the run."""
        self._reduce_pending()
        self._worker.close()
        if isinstance(self._worker.error, _PeerFailed):
            raise ScoringError(str(self._worker.error))
        if self._worker.error is not None:
            raise self._worker.error
        return self.totals

    def abort(self) -> None:
        """Stop the host worker after its queued jobs (error paths; idempotent)."""
        self._worker.close()

    def _to_device(self, batch: HostBatch) -> Rows:
        dev = self.lm.device
        data = batch.data.to(dev, non_blocking=True)  # [3, b, s]; pinned source: asynchronous
        mask = batch.attention_mask
        if mask is not None:
            mask = mask.to(dev, non_blocking=True)  # DocumentMask: [b, s] segment ids
        return Rows(data[0], data[1], data[2], mask)

    @staticmethod
    def _to_host(t: torch.Tensor):
        """(host tensor, CUDA event to wait for before reading it, or None)."""
        if t.device.type != "cuda":
            return t, None
        host = t.to("cpu", non_blocking=True)  # into pinned memory, asynchronous
        event = torch.cuda.Event()
        event.record()
        return host, event

    def _reduce_pending(self) -> None:
        """Reduce the round whose statistics are still pending, if any (once)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._reduce(pending)

    def _reduce(self, pending: Future) -> None:
        import torch.distributed as dist

        error = None
        try:
            stats = pending.result()  # [5] float64; waits for the host worker, not the device
        except _PeerFailed as e:
            raise ScoringError(str(e)) from None  # the failed rank has left: no collective
        except BaseException as e:  # noqa: BLE001 - re-raised after telling the other ranks
            error, stats = e, np.zeros(5)
            stats[FAILED] = 1
        t = torch.from_numpy(stats)
        if self.lm.device.type == "cuda":
            t = t.pin_memory().to(self.lm.device, non_blocking=True)
        dist.all_reduce(t, group=self._group)
        if error is not None:
            raise error
        self._worker.submit(self._account, *self._to_host(t))

    # -- host worker thread -----------------------------------------------------------------------
    @staticmethod
    def _scatter(chunk: PreparedChunk, batch: HostBatch, losses: torch.Tensor, event) -> None:
        if event is not None:
            event.synchronize()
        batch.scatter(losses.numpy(), chunk.values)

    def _end_round(self, chunk: PreparedChunk | None) -> np.ndarray:
        stats = np.zeros(5)
        if chunk is not None:
            if self._write is not None:
                self._write(chunk)
            stats[:4] = chunk.stats()
        if self._crash is not None:
            self._crash.reached("range")
        return stats

    def _account(self, reduced: torch.Tensor, event) -> None:
        if event is not None:
            event.synchronize()
        docs, tokens, loss_sum, count, failed = reduced.numpy().tolist()
        if failed:
            raise _PeerFailed(
                f"{int(failed)} rank(s) failed while scoring (see their error); the values "
                f"written so far are kept for a rerun"
            )
        t = self.totals
        t.documents += int(docs)
        t.tokens += int(tokens)
        t.loss_sum += loss_sum
        t.loss_count += int(count)
        if self._crash is not None:
            self._crash.reached("commit")
        if self._on_round is not None:
            self._on_round(t)
