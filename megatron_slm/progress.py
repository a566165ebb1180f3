"""The progress line of long jobs: done/total, rate, ETA.

On a terminal one line is redrawn in place (``\\r``, at most twice a second); in a log (SLURM) a
line is printed every 10 seconds, so logs stay short and still show the rate and ETA.
"""

from __future__ import annotations

import math
import sys
import time


def rate_text(rate: float) -> str:
    """Whole numbers from 100 up, three significant digits below: a job at one checkpoint a
    minute shows 0.0167, not 0."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--:--"
    s = int(seconds + 0.5)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressBar:
    """``bar.update(done, extra="...")`` with ``done`` counted in ``unit`` (e.g. tokens)."""

    def __init__(self, name: str, total: int, unit: str, enabled: bool = True, stream=None):
        self.name, self.total, self.unit, self.enabled = name, total, unit, enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and self.stream.isatty()
        self.start = time.perf_counter()
        self.last = -1e9

    def update(self, done: int, extra: str = "", final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        frac = done / self.total if self.total else 1.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        width = 24
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        line = (
            f"[{self.name}] [{bar}] {100 * frac:5.1f}% {done}/{self.total} {self.unit} | "
            f"{rate_text(rate)} {self.unit}/s | ETA {hms(eta)}" + (f" | {extra}" if extra else "")
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
