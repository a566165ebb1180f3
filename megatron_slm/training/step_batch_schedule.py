"""--step-batch-size-schedule: Megatron-LM's global batch size in steps over the tokens trained.

``"0:16 2.4B:320 4.8B:624 12B:1536"`` (Megatron-LM's GPT-3 example) trains at a global batch of
16 until 2.4B tokens are consumed, then 320, and so on. As in megatron-core's
``StepBatchsizeNumMicroBatchesCalculator``: entries are ``THRESHOLD:SIZE`` separated by spaces or
commas, numbers may end in K, M, B or T (10^3 .. 10^12), thresholds are tokens, turned into
samples by integer division by --seq-length, sorted, and must start at 0 and increase; the size
of a step is that of the last threshold the consumed samples have reached. With --train-samples
the run takes steps until it has consumed at least that many (Megatron-LM's
``update_train_iters``). Like the ramp of ``batch_ramp.py`` it is a pure function of the
consumed-sample count, which checkpoints record, and the learning-rate schedule counts samples in
full batches of the schedule's last size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_slm.errors import ConfigError

FLAG = "--step-batch-size-schedule"
_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


@dataclass(frozen=True)
class StepBatchSchedule:
    steps: tuple[tuple[int, int], ...]  # (threshold in samples, global batch size), ascending

    @property
    def final(self) -> int:
        return self.steps[-1][1]

    def size_at(self, consumed_samples: int) -> int:
        """The global batch size of the step that starts after ``consumed_samples``."""
        return self.steps[self._entry(consumed_samples)][1]

    def train_iters(self, train_samples: int) -> int:
        """Steps until at least ``train_samples`` samples are consumed (the last step may pass
        it): Megatron-LM's step count for --train-samples."""
        iters, consumed = 0, 0
        while consumed < train_samples:
            size, bound = self._segment(consumed)
            taken = math.ceil((min(bound, train_samples) - consumed) / size)
            iters, consumed = iters + taken, consumed + taken * size
        return iters

    def consumed_after(self, iters: int) -> int:
        """Samples that ``iters`` steps from the start consume."""
        consumed = 0
        while iters > 0:
            size, bound = self._segment(consumed)
            taken = iters if bound == math.inf else min(iters, math.ceil((bound - consumed) / size))
            iters, consumed = iters - taken, consumed + taken * size
        return consumed

    def sizes_from(self, consumed_samples: int) -> list[int]:
        """Every size a run that has consumed ``consumed_samples`` may still train at."""
        return [size for _, size in self.steps[self._entry(consumed_samples) :]]

    def _entry(self, consumed: int) -> int:
        return max(i for i, (threshold, _) in enumerate(self.steps) if threshold <= consumed)

    def _segment(self, consumed: int) -> tuple[int, float]:
        """(size, the next threshold or infinity) at ``consumed``."""
        i = self._entry(consumed)
        bound = self.steps[i + 1][0] if i + 1 < len(self.steps) else math.inf
        return self.steps[i][1], bound


def _number(text: str, entry: str) -> int:
    value = text.strip().upper()
    scale = _SUFFIXES.get(value[-1:], 1)
    if scale > 1:
        value = value[:-1]
    try:
        return int(float(value) * scale)
    except ValueError:
        raise ConfigError(f"{FLAG}: {entry!r} is not THRESHOLD:SIZE with numbers") from None


def parse_step_schedule(text: str, seq_length: int) -> StepBatchSchedule:
    """The schedule of ``text`` (thresholds in tokens), checked as megatron-core checks it."""
    steps = []
    for entry in text.replace(",", " ").split():
        if ":" not in entry:
            raise ConfigError(f'{FLAG}: {entry!r} is not THRESHOLD:SIZE (e.g. "0:16 2.4B:320")')
        threshold, size = entry.split(":", 1)
        steps.append((_number(threshold, entry) // seq_length, _number(size, entry)))
    if not steps:
        raise ConfigError(f'{FLAG} is empty: give THRESHOLD:SIZE entries, e.g. "0:16 2.4B:320"')
    steps.sort(key=lambda step: step[0])
    if steps[0][0] != 0:
        raise ConfigError(
            f"{FLAG}: the first threshold must be 0 (the size training starts at), got "
            f"{steps[0][0] * seq_length} tokens"
        )
    for (before, _), (after, _) in zip(steps, steps[1:]):
        if after <= before:
            raise ConfigError(
                f"{FLAG}: two thresholds fall on the same sample count ({after} samples of "
                f"--seq-length {seq_length}): thresholds must increase"
            )
    for _, size in steps:
        if size < 1:
            raise ConfigError(f"{FLAG}: every global batch size must be >= 1, got {size}")
    return StepBatchSchedule(tuple(steps))


def check_schedule_sizes(
    schedule: StepBatchSchedule, consumed_samples: int, per_micro_batch: int
) -> None:
    """Every size still to come (from ``consumed_samples``: a resumed run may have trained its
    earlier sizes at another data-parallel size, as megatron-core allows) splits into whole
    micro-batches of ``per_micro_batch`` samples (the interleaved schedule's rule on their number
    is the trainer's, ``training.config.microbatches_fit``)."""
    for size in schedule.sizes_from(consumed_samples):
        if size % per_micro_batch:
            raise ConfigError(
                f"{FLAG}: the global batch size {size} is not a multiple of {per_micro_batch} "
                "(--micro-batch-size x data-parallel size)"
            )
