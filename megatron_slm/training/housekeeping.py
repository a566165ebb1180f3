"""What the loop does around its steps besides training: Python's garbage collection under
``--manual-gc`` and the ``--profile`` range (Megatron-LM's flags)."""

from __future__ import annotations

import contextlib
import gc
import logging

import torch

from megatron_slm.training.config import PretrainConfig

logger = logging.getLogger("megatron_slm")


class ManualGC:
    """--manual-gc: automatic collection off for the run, a collection at the start, every
    --manual-gc-interval steps and (--manual-gc-eval) around evaluations; restored at close."""

    def __init__(self, cfg: PretrainConfig):
        t = cfg.training
        self.enabled = t.manual_gc
        self.interval = t.manual_gc_interval
        self.around_eval = t.manual_gc_eval
        self._was_enabled = gc.isenabled()
        if self.enabled:
            gc.disable()
            gc.collect()

    def after_step(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def evaluation(self):
        collect = self.enabled and self.around_eval
        if collect:
            gc.collect()
        try:
            yield
        finally:
            if collect:
                gc.collect()

    def close(self) -> None:
        if self.enabled and self._was_enabled:
            gc.enable()


class StepProfiler:
    """--profile on this rank (--profile-ranks): the steps after --profile-step-start finished
    steps, up to step --profile-step-end, are profiled: torch.profiler's trace to
    --tensorboard-dir (--use-pytorch-profiler; one step of warmup before), else the CUDA
    profiler range that ``nsys --capture-range=cudaProfilerApi`` records."""

    def __init__(self, cfg: PretrainConfig, rank: int, device: torch.device):
        lg = cfg.logging
        self.enabled = lg.profile and rank in lg.profile_ranks
        self.start_at, self.stop_at = lg.profile_step_start, lg.profile_step_end
        self.torch_profiler = lg.use_pytorch_profiler
        self.trace_dir, self.device = lg.tensorboard_dir, device
        self._active = None  # (config.validate refused nsys without a GPU)

    def before_step(self, completed: int) -> None:
        if not self.enabled or self._active is not None:
            return
        # torch.profiler warms up on the step before the range (as Megatron-LM's schedule).
        warmup = 1 if self.torch_profiler and self.start_at > 0 else 0
        if completed != self.start_at - warmup:
            return
        if self.torch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._active = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(
                    wait=0, warmup=warmup, active=self.stop_at - self.start_at, repeat=1
                ),
                record_shapes=True,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.trace_dir),
            )
            self._active.start()
        else:
            torch.cuda.cudart().cudaProfilerStart()
            self._active = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self._active.__enter__()
        logger.info("profiling steps %d to %d", self.start_at + 1, self.stop_at)

    def step(self, completed: int) -> None:
        """After a step: ``completed`` steps are done."""
        if self._active is not None and self.torch_profiler:
            self._active.step()
        if completed >= self.stop_at:
            self.close()

    def close(self) -> None:
        if self._active is None:
            return
        active, self._active = self._active, None
        if self.torch_profiler:
            active.stop()  # (the schedule's end wrote the trace)
            logger.info("profile trace written to %s", self.trace_dir)
        else:
            active.__exit__(None, None, None)
            torch.cuda.cudart().cudaProfilerStop()
