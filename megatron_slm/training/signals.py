"""Clean exits: a signal (SLURM's pre-emption SIGTERM), a wall-clock budget, a step interval.

The signal handler only sets a flag; the loop checks it after each step, all ranks agree through
one all-reduce, the trainer saves a checkpoint and returns normally, so a requeued job resumes.

With several ranks the agreement is a collective whose result the host must read, a wait for the
device, so it runs at log steps only (``--log-interval``): a signal or the time limit is acted on
up to ``log-interval`` steps late. Give SLURM's ``--signal=TERM@SECONDS`` lead time for that many
steps plus a checkpoint save. A single process needs no agreement and checks every step.
"""

from __future__ import annotations

import logging
import signal
import time

import torch
import torch.distributed as dist

from megatron_slm.training.config import CheckpointArgs

logger = logging.getLogger("megatron_slm")


class ExitController:
    def __init__(self, cfg: CheckpointArgs, device: torch.device):
        self.cfg, self.device = cfg, device
        self.start = time.monotonic()
        self.received = False
        self._previous = None
        if cfg.exit_signal_handler:
            self.signum = getattr(signal, cfg.exit_signal)
            self._previous = signal.signal(self.signum, self._handle)

    def _handle(self, signum, _frame):
        logger.warning(
            "received %s: will save and exit after this step", signal.Signals(signum).name
        )
        self.received = True

    def should_exit(self, iteration: int, vote: bool = True) -> str | None:
        """The reason to stop after ``iteration`` (same answer on every rank), or None.

        ``vote``: whether ranks may agree on the signal and time flags at this step (every rank
        passes the same value; the trainer passes "this is a log step")."""
        flags = [
            self.received,
            self.cfg.exit_duration_in_mins is not None
            and (time.monotonic() - self.start) / 60 > self.cfg.exit_duration_in_mins,
        ]
        if dist.is_initialized() and dist.get_world_size() > 1:
            if vote:
                votes = torch.tensor([float(f) for f in flags], device=self.device)
                dist.all_reduce(votes, op=dist.ReduceOp.MAX)
                flags = [v > 0 for v in votes.tolist()]
            else:
                flags = [False, False]
        if flags[0]:
            return f"signal {self.cfg.exit_signal}"
        if flags[1]:
            return f"--exit-duration-in-mins {self.cfg.exit_duration_in_mins}"
        if self.cfg.exit_interval and iteration % self.cfg.exit_interval == 0:
            return f"--exit-interval {self.cfg.exit_interval}"
        return None

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None
