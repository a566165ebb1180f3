"""The checkpoint writers' result queue between real processes: a forked writer's report reaches
the rank, the helper serving it imports no torch, ignores a job's exit signals and dies with its
rank."""

import multiprocessing
import os
import queue as queues
import signal
import subprocess
import sys
import time

import pytest
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult

from megatron_slm import writer_queue

# The rank loads writer_queue.py by path: importing the megatron_slm package imports torch, which
# would make it take seconds to start.
_RANK = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("writer_queue", {module!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
queue = mod.start_queue()
print(mod._servers[0][1].pid, flush=True)
time.sleep(600)
"""


def _report(queue, item) -> None:
    queue.put(item)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has died
    except FileNotFoundError:
        return False


def test_a_forked_writers_report_reaches_the_rank_through_a_helper_without_torch(monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    writer_queue.install()  # what a save does first
    queue = filesystem_async._get_write_results_queue()  # what megatron-core's writers use
    helper = writer_queue._servers[-1][1]
    report = {0: [WriteResult(MetadataIndex("a.b", (0, 4)), 12, "storage")]}
    writer = multiprocessing.get_context("fork").Process(target=_report, args=(queue, report))
    writer.start()
    writer.join(30)
    assert writer.exitcode == 0
    assert queue.get(timeout=30) == report
    with pytest.raises(queues.Empty):  # how megatron-core polls it
        queue.get_nowait()
    with open(f"/proc/{helper.pid}/maps") as f:
        assert "libtorch" not in f.read()  # the report travelled as bytes


def test_the_helper_ignores_the_jobs_signals_and_dies_with_its_rank():
    rank = subprocess.Popen(
        [sys.executable, "-c", _RANK.format(module=writer_queue.__file__)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        helper = int(rank.stdout.readline())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            os.kill(helper, sig)  # SLURM signals every process of a step
        time.sleep(0.5)
        assert _alive(helper)
        rank.kill()
        rank.wait()
        deadline = time.monotonic() + 30
        while _alive(helper) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(helper)  # no orphan holding the job's output pipes
    finally:
        rank.kill()
        rank.wait()
