"""A progress line for long refining runs: documents/s, tokens/s and ETA, every few seconds."""

from __future__ import annotations

import math
import sys
import time


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--:--"
    s = int(seconds + 0.5)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """ETA from input bytes: the total is the size of this worker's unfinished shards, so it is
    known before the first document is read."""

    def __init__(
        self, total_bytes: int, interval: float, label: str, unit: str = "tokens", stream=None
    ):
        self.total_bytes = max(total_bytes, 1)
        self.interval = interval
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.last = self.start
        self.documents = self.tokens = self.bytes = 0

    def update(self, documents: int, tokens: int, nbytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        fraction = min(self.bytes / self.total_bytes, 1.0)
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else math.inf
        return (
            f"{self.label}: {100 * fraction:5.1f}% {self.documents:,} docs "
            f"{self.documents / elapsed:,.1f} docs/s {self.tokens / elapsed:,.0f} {self.unit}/s "
            f"elapsed {hms(elapsed)} ETA {hms(eta)}"
        )
