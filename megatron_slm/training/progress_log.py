"""``--log-progress``: Megatron-LM's ``<save>/progress.txt``, one line per job start, checkpoint
and deleted checkpoint, in its format, so tools that read that file read ours::

    2026-12-06 10:00:00\tJob ID: 123\t# GPUs: 8\tStarting job
    2026-12-06 11:00:00\tJob ID: 123\t# GPUs: 8\tSaved checkpoint\tIteration: 500\t
        Job throughput: 180.2 TFLOP/s/GPU\tCumulative throughput: 176.9 TFLOP/s/GPU\t
        Floating-point operations: 2.10e+19\tTokens (in billions): 4.19

(the second line is one line in the file). The operations count the model's training FLOPs of
the samples consumed so far (``GPTModelConfig.flops_per_token``, the figure MFU is computed
from; --iterations-to-skip's dropped samples included), so they continue across restarts
without a counter in the checkpoint. The job's throughput counts from its start; the
cumulative one from the start of the earliest job of an unbroken run of jobs with this many
devices, as Megatron-LM computes it.
"""

from __future__ import annotations

import os
import time
from datetime import datetime

FILE_NAME = "progress.txt"
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def _field(token: str) -> str:
    return token.split(": ", 1)[1]


def cumulative_start(path: str, world_size: int) -> tuple[datetime, float] | None:
    """(start time, operations done then) of the earliest job of the last unbroken run of jobs
    with ``world_size`` devices in the progress file ``path``: the operations of the last
    checkpoint saved before that job started. None when the file names no such job."""
    start, latest = None, 0.0
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        for line in f:
            tokens = line.rstrip("\n").split("\t")
            if len(tokens) < 4 or not tokens[2].startswith("# GPUs: "):
                continue  # (not a line of this format)
            if tokens[3] == "Saved checkpoint" and len(tokens) > 7:
                latest = float(_field(tokens[7]))
            if int(_field(tokens[2])) != world_size:
                start = None  # a job of another size breaks the run
            elif tokens[3] == "Starting job" and start is None:
                start = (datetime.strptime(tokens[0], _TIME_FORMAT), latest)
    return start


class ProgressLog:
    """Appends to ``<save>/progress.txt``; only rank 0's is ``active`` (writes, reads)."""

    def __init__(self, save: str, world_size: int, flops_per_sample: float, active: bool):
        self.path = os.path.join(save, FILE_NAME)
        self.world_size, self.flops_per_sample, self.active = world_size, flops_per_sample, active
        self._started, self._flops_at_start = time.time(), 0.0
        self._run_start = (datetime.fromtimestamp(self._started), 0.0)  # (cumulative_start's)

    def start(self, consumed_samples: int) -> None:
        """The job starts (after a --load: at the loaded position). The file is read once, here:
        the run of jobs of this size that the cumulative throughput counts from."""
        self._started = time.time()
        self._flops_at_start = consumed_samples * self.flops_per_sample
        self.append("Starting job")
        found = cumulative_start(self.path, self.world_size) if self.active else None
        self._run_start = found or (datetime.fromtimestamp(self._started), self._flops_at_start)

    def saved(self, iteration: int, consumed_samples: int, seq_length: int) -> str:
        """The line of a checkpoint of ``iteration``, its figures as of now (the caller appends
        it once the checkpoint is published: a background save's later)."""
        flops = consumed_samples * self.flops_per_sample
        job = (flops - self._flops_at_start) / (time.time() - self._started + 1e-9)
        start, flops_then = self._run_start
        cumulative = (flops - flops_then) / ((datetime.now() - start).total_seconds() + 1e-9)
        per_device = 1e12 * self.world_size
        return (
            f"Saved checkpoint\tIteration: {iteration}\t"
            f"Job throughput: {job / per_device:.1f} TFLOP/s/GPU\t"
            f"Cumulative throughput: {cumulative / per_device:.1f} TFLOP/s/GPU\t"
            f"Floating-point operations: {flops:.2e}\t"
            f"Tokens (in billions): {consumed_samples * seq_length / 1e9:.2f}"
        )

    def append(self, message: str) -> None:
        if not self.active:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        stamp = datetime.now().strftime(_TIME_FORMAT)
        job = os.environ.get("SLURM_JOB_ID", "")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{stamp}\tJob ID: {job}\t# GPUs: {self.world_size}\t{message}\n")
