"""The scorer's rounds on a GPU under ``torch.cuda.set_sync_debug_mode("error")`` (pinned host
batches, ``non_blocking`` copies both ways, an NCCL group for the round collective): any host
wait on the main thread raises. The CPU twin (``tests/unit/scoring/test_pipeline.py``) counts
syncs with ``SyncCounter``; this one also catches waits only CUDA has (blocking copies, stream
synchronisation). The values are checked as there."""

from __future__ import annotations

import pytest

from tests.dist_helpers import run_distributed
from tests.unit.scoring.test_pipeline import _sync_free_worker, check_sync_free_and_exact

pytestmark = pytest.mark.gpu


def test_scorer_rounds_never_sync_on_gpu():
    check_sync_free_and_exact(run_distributed(_sync_free_worker, 1, "cuda")[0])
