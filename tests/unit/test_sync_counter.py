"""The sync counter (tests/sync_counter.py) sees each kind of host read it promises to."""

from __future__ import annotations

import threading

import numpy as np
import torch

from tests.sync_counter import SyncCounter


def test_counts_each_kind_of_host_read():
    x = torch.arange(6.0)
    mask = x > 2
    reads = [
        lambda: x.sum().item(),
        lambda: bool(x.sum()),
        lambda: float(x[0]),
        lambda: int(x[1]),
        lambda: x.nonzero(),
        lambda: x[mask],
        lambda: torch.masked_select(x, mask),
        lambda: x.tolist(),
        lambda: x.numpy(),
        lambda: x.cpu(),
        lambda: np.asarray(x),
        lambda: torch.unique(x),
    ]
    for i, read in enumerate(reads):
        with SyncCounter() as c:
            read()
        assert c.count >= 1, f"read {i} not counted"


def test_device_side_work_is_not_counted():
    x = torch.randn(64, 8)
    with SyncCounter() as c:
        y = torch.where(x > 0, x, torch.zeros_like(x)).sum(dim=0)
        torch._assert_async((y >= 0).all(), "non-negative")
        x[torch.tensor([1, 2])] += 1  # integer index: no read-back
        torch.topk(y, 3)
    assert c.count == 0, c.report()


def test_other_threads_are_not_counted_and_methods_are_restored():
    x = torch.arange(4)
    with SyncCounter() as c:
        t = threading.Thread(target=lambda: (x.tolist(), x.sum().item()))
        t.start()
        t.join()
    assert c.count == 0, c.report()
    with SyncCounter() as c:
        x.tolist()
    assert c.events and "test_sync_counter.py" in next(iter(c.events))
    assert torch.Tensor.tolist is not None and x.tolist() == [0, 1, 2, 3]
