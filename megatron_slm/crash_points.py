"""Named crash points for resume tests: a long job calls ``points.reached("commit")`` where a real
crash would hurt most, and a test sets ``<ENV>=<point>:<k>`` to SIGKILL the process at the k-th
(1-based) time it gets there. Unset, a point costs one dictionary lookup."""

from __future__ import annotations

import os
import signal
import sys


class CrashPoints:
    def __init__(self, env_var: str):
        self.env_var = env_var
        self.counts: dict[str, int] = {}

    def reached(self, point: str) -> None:
        spec = os.environ.get(self.env_var)
        if not spec:
            return
        name, _, k = spec.partition(":")
        if name != point:
            return
        self.counts[point] = self.counts.get(point, 0) + 1
        if self.counts[point] == int(k or 1):
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
