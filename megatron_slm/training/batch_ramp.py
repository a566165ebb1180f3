"""--rampup-batch-size: Megatron-LM's global batch size as training consumes samples.

Megatron-LM grows the global batch from ``start`` by ``increment`` every ``samples / ((global -
start) / increment)`` consumed samples and trains at --global-batch-size once more than
``samples`` are consumed (megatron-core's ``RampupBatchsizeNumMicroBatchesCalculator``); the step
count of --train-samples follows from it (Megatron-LM's ``update_train_iters``). Here the rule is a
pure function of the consumed-sample count, which checkpoints record, so a resumed run continues
the ramp where it stopped. The learning-rate schedule counts samples as Megatron-LM's does: a step
of ``b`` samples advances it by ``b / global`` of a full step.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_slm.errors import ConfigError

FLAG = "--rampup-batch-size"


@dataclass(frozen=True)
class BatchRamp:
    start: int
    increment: int
    samples: int
    final: int  # --global-batch-size

    def size_at(self, consumed_samples: int) -> int:
        """The global batch size of the step that starts after ``consumed_samples``."""
        if consumed_samples > self.samples:
            return self.final
        # megatron-core's arithmetic exactly (a float per increment, truncated).
        per_increment = self.samples / ((self.final - self.start) // self.increment)
        return self.start + int(consumed_samples / per_increment) * self.increment

    def train_iters(self, train_samples: int) -> int:
        """Megatron-LM's step count for --train-samples: ramp steps while the consumed count is
        within both the ramp and --train-samples (the last of them may pass either), then the
        whole full batches of what is left."""
        iters, consumed = self._ramp_steps(lambda _steps, c: c <= train_samples)
        if train_samples > consumed:
            iters += (train_samples - consumed) // self.final
        return iters

    def consumed_after(self, iters: int) -> int:
        """Samples that ``iters`` steps from the start consume."""
        steps, consumed = self._ramp_steps(lambda n, _consumed: n < iters)
        return consumed + (iters - steps) * self.final

    def _ramp_steps(self, go_on) -> tuple[int, int]:
        """(steps, samples) of the ramp's steps taken while ``go_on(steps, consumed)`` holds."""
        steps, consumed = 0, 0
        while consumed <= self.samples and go_on(steps, consumed):
            consumed += self.size_at(consumed)
            steps += 1
        return steps, consumed

    def sizes(self) -> range:
        """Every global batch size the run trains at."""
        return range(self.start, self.final + 1, self.increment)


def check_ramp_values(values: list[int], train_samples: int | None) -> None:
    """The flag on its own: three positive numbers, with Megatron-LM's sample-based training."""
    if not values:
        return
    if len(values) != 3:
        raise ConfigError(f"{FLAG} takes three numbers: START INCREMENT SAMPLES")
    for name, value in zip(("start batch size", "increment", "ramp samples"), values):
        if value < 1:
            raise ConfigError(f"{FLAG}: the {name} must be >= 1, got {value}")
    if train_samples is None:
        raise ConfigError(
            f"{FLAG} ramps the batch over samples: train with --train-samples (Megatron-LM's "
            "rule: no batch-size ramp-up for iteration-based training)"
        )


def batch_ramp(values: list[int], global_batch_size: int, per_micro_batch: int) -> BatchRamp:
    """The ramp of ``values`` (START INCREMENT SAMPLES) up to ``global_batch_size``, checked so
    that every size it takes splits into whole micro-batches of ``per_micro_batch`` samples
    (--micro-batch-size x data-parallel size; the interleaved schedule's rule on their number is
    the trainer's, ``training.config.microbatches_fit``)."""
    start, increment, samples = values
    if start >= global_batch_size:
        raise ConfigError(
            f"{FLAG}: the start batch size {start} must be smaller than --global-batch-size "
            f"{global_batch_size}"
        )
    if (global_batch_size - start) % increment:
        raise ConfigError(
            f"{FLAG}: --global-batch-size {global_batch_size} minus the start {start} is not a "
            f"multiple of the increment {increment}"
        )
    ramp = BatchRamp(start, increment, samples, global_batch_size)
    for size in ramp.sizes():
        if size % per_micro_batch:
            raise ConfigError(
                f"{FLAG} {start} {increment} {samples}: the ramp trains at a global batch of "
                f"{size}, not a multiple of {per_micro_batch} (--micro-batch-size x "
                "data-parallel size)"
            )
    return ramp
