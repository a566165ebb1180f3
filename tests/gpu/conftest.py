"""tests/gpu: the op's calls that must be free of host syncs run under CUDA's sync-debug mode."""

from __future__ import annotations

import contextlib

import pytest
import torch


@contextlib.contextmanager
def sync_debug_error():
    """Inside, any CUDA call that synchronizes the host with the device raises RuntimeError
    (``torch.cuda.set_sync_debug_mode("error")``: ``.item()``, device-to-host and blocking
    host-to-device copies, ``nonzero``, ...). The mode is process-wide, so it also covers the
    autograd engine's backward thread."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.fixture
def no_host_sync():
    """The :func:`sync_debug_error` context manager, for the op calls under test (the checks of
    their values read results back, so they stay outside it)."""
    return sync_debug_error
