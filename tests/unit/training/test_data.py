"""``MicroBatches`` on a DataLoader: Megatron-LM's sample order for every data-parallel rank, with
and without worker processes, resumable from any consumed-sample count, and its ``read`` record
and ``consumed_samples`` counting what was handed out (not what workers read ahead); workers
survive the trainer's exit signal (SLURM sends it to every process of the step)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from megatron.core import parallel_state

from megatron_slm.training.data import MicroBatches

MBS, DP, SIZE = 2, 3, 40  # 40 samples: 6 whole global batches of 6, 4 samples left over


class _Samples(torch.utils.data.Dataset):
    """Sample i: tokens [i, i+1, i+2]; numpy, like megatron-core's datasets' fields."""

    def __len__(self):
        return SIZE

    def __getitem__(self, i):
        return {"tokens": np.arange(i, i + 3), "loss_mask": np.ones(3, np.float32), "skip": "x"}


def _expected(dp_rank: int, consumed: int) -> list[list[int]]:
    """Megatron-LM's order, written out: global batch chunks of MBS * DP consecutive samples,
    rank r takes the r-th MBS slice of each; only whole micro-batches."""
    out = []
    for chunk in range(consumed, SIZE, MBS * DP):
        ids = list(range(chunk + dp_rank * MBS, chunk + (dp_rank + 1) * MBS))
        if ids[-1] < SIZE:
            out.append(ids)
    return out


@pytest.fixture
def dp_rank(monkeypatch):
    rank = {"value": 0}
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: DP)
    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda: rank["value"])
    return rank


@pytest.mark.parametrize("workers", [0, 2])
def test_order_resume_and_record(dp_rank, workers):
    for rank in range(DP):
        dp_rank["value"] = rank
        for consumed in (0, MBS * DP * 2):  # from the start, and resumed after two steps
            batches = MicroBatches(_Samples(), MBS, consumed, num_workers=workers)
            batches.read = []
            seen, counts = [], []
            for batch in batches:
                assert set(batch) == {"tokens", "loss_mask"}  # only the trainer's keys
                assert batch["tokens"].shape == (MBS, 3)
                seen.append(batch["tokens"][:, 0].tolist())
                counts.append(batches.consumed_samples)
            expected = _expected(rank, consumed)
            assert seen == expected
            assert batches.read == [i for ids in expected for i in ids]
            assert counts == [consumed + MBS * DP * (k + 1) for k in range(len(expected))]


def test_consumed_counts_handed_out_batches_not_prefetched(dp_rank):
    batches = MicroBatches(_Samples(), MBS, 0, num_workers=2)
    next(batches)  # the workers have read ahead by now
    assert batches.consumed_samples == MBS * DP
    resumed = MicroBatches(_Samples(), MBS, batches.consumed_samples, num_workers=0)
    assert torch.equal(next(batches)["tokens"], next(resumed)["tokens"])
    batches.close()


def _signal_worker(batches: MicroBatches, signum: int) -> None:
    next(batches)  # workers started
    (worker,) = batches._batches._workers  # the DataLoader iterator's worker processes
    os.kill(worker.pid, signum)
    time.sleep(0.5)


def test_workers_ignore_the_exit_signal(dp_rank):
    dp_rank["value"] = 0
    batches = MicroBatches(_Samples(), MBS, 0, num_workers=1, ignored_signals=(signal.SIGTERM,))
    _signal_worker(batches, signal.SIGTERM)
    assert len(list(batches)) == len(_expected(0, 0)) - 1  # every remaining micro-batch
    # Control: a worker that does not ignore it dies, and the loader fails in the trainer.
    batches = MicroBatches(_Samples(), MBS, 0, num_workers=1)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        _signal_worker(batches, signal.SIGTERM)
        list(batches)
    batches.close()


def test_rewind_restarts_on_the_same_workers(dp_rank):
    """The validation batches of every evaluation: the same micro-batches again, read by the
    same worker processes (no fork per evaluation)."""
    dp_rank["value"] = 1
    batches = MicroBatches(_Samples(), MBS, 0, num_workers=2)
    first = [next(batches)["tokens"][:, 0].tolist() for _ in range(3)]
    assert first == _expected(1, 0)[:3]
    workers = list(batches._batches._workers)
    for _ in range(2):
        batches.rewind()
        assert batches.consumed_samples == 0
        assert [next(batches)["tokens"][:, 0].tolist() for _ in range(3)] == first
        assert batches._batches._workers == workers and all(w.is_alive() for w in workers)
    batches.close()
    for worker in workers:
        worker.join(timeout=10)
        assert not worker.is_alive()
    # after a close, a new loader continues where the last one stopped
    assert next(batches)["tokens"][:, 0].tolist() == _expected(1, 0)[3]
    batches.close()
