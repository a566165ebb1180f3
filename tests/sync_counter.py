"""Count host synchronisations on CPU, where there is no device to wait for.

On a GPU, every place where the host reads a device value (``.item()``, ``if tensor:``, a
boolean-mask index, ``.cpu()``, ``.tolist()``...) stalls the host until the device has caught up.
On CPU none of them costs anything, so a hot path can grow one without any test noticing. This
counter makes them visible on CPU: inside ``with SyncCounter() as c:`` it records

* aten operators that read device values back on CUDA (through a ``TorchDispatchMode``):
  ``_local_scalar_dense`` (``item``, ``bool``, ``float``, ``int``), ``nonzero``,
  ``masked_select``, ``unique``, ``equal``, indexing with a boolean mask, ...
* the Python-level reads that never reach the dispatcher on CPU: ``Tensor.tolist``,
  ``Tensor.numpy``, ``Tensor.cpu``, ``Tensor.__array__`` (``np.asarray(t)``), and
  ``torch.cuda.synchronize`` / ``Stream.synchronize`` / ``Event.synchronize``.

Only the thread that entered the counter is watched: a hot path may hand device->host copies
to a writer thread (the scorer does), which is where such waits belong.
``c.count`` is the total, ``c.events`` names each occurrence (with the caller's file:line for the
Python-level ones), so a failing assertion says where the sync came from.
"""

from __future__ import annotations

import threading
import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_ATEN = {
    "_local_scalar_dense",
    "is_nonzero",
    "nonzero",
    "nonzero_static",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "equal",
    "allclose",
    "repeat_interleave",
}
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
_TENSOR_METHODS = ("tolist", "numpy", "cpu", "__array__")


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
        for i in (indices or ())
    )


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):  # innermost first
        if frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno}"
    return "?"


class _Mode(TorchDispatchMode):
    def __init__(self, record):
        super().__init__()
        self._record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in _SYNC_ATEN or (name in _INDEX_OPS and _bool_index(args)):
            self._record(f"aten.{name}")
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Context manager counting host syncs of the current thread (see module doc)."""

    def __init__(self):
        self.events: Counter = Counter()
        self._thread = threading.get_ident()
        self._saved: list[tuple[object, str, object]] = []
        self._mode = _Mode(self._record)

    @property
    def count(self) -> int:
        return sum(self.events.values())

    def _record(self, what: str) -> None:
        if threading.get_ident() == self._thread:
            self.events[what] += 1

    def _wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        record = self._record

        def wrapper(*args, **kwargs):
            record(f"{label} at {_caller()}")
            return original(*args, **kwargs)

        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    def __enter__(self) -> SyncCounter:
        self._thread = threading.get_ident()
        for name in _TENSOR_METHODS:
            self._wrap(torch.Tensor, name, f"Tensor.{name}")
        self._wrap(torch.cuda, "synchronize", "cuda.synchronize")
        self._wrap(torch.cuda.Stream, "synchronize", "Stream.synchronize")
        self._wrap(torch.cuda.Event, "synchronize", "Event.synchronize")
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def report(self) -> str:
        return ", ".join(f"{k} x{v}" for k, v in self.events.most_common()) or "none"
