"""Console lines, TensorBoard scalars/histograms and the per-step JSON log of the trainer.

Statistics are summed over micro-batches and data-parallel ranks on the last pipeline stage; the
global last rank (last stage) writes, as in Megatron-LM.
"""

from __future__ import annotations

import json
import logging
import math

import torch
import torch.distributed as dist

from megatron_slm.models.presets import GPTModelConfig
from megatron_slm.training.config import DerivedSizes, PretrainConfig

logger = logging.getLogger("megatron_slm")

# Order of the per-micro-batch statistics vector (names of the selective op's stats).
STAT_KEYS = ("loss_sum", "n_valid", "selected_loss_sum", "n_selected", "excess_sum", "n_scored")

# Dense bf16 peak TFLOP/s per device, for MFU (by substring of the device name).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class TrainingLogger:
    def __init__(
        self, cfg: PretrainConfig, arch: GPTModelConfig, sizes: DerivedSizes, device: torch.device
    ):
        self.cfg, self.sizes = cfg, sizes
        self.world = dist.get_world_size()
        self.is_writer = dist.get_rank() == self.world - 1
        self.tokens_per_step = sizes.global_batch_size * cfg.training.seq_length
        self.flops_per_step = arch.flops_per_token(cfg.training.seq_length) * self.tokens_per_step
        self.peak = device_peak_tflops(device)
        self.tb = None
        if self.is_writer and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(cfg.logging.tensorboard_dir)
        self.loss_file = (
            open(cfg.logging.log_loss_file, "a")
            if self.is_writer and cfg.logging.log_loss_file
            else None
        )
        self._window = []

    def step(self, iteration, stats, grad_norm, lr, seconds, consumed_samples, ratio, last, ref):
        if not self.is_writer or stats is None:
            return
        s = dict(zip(STAT_KEYS, stats.tolist()))
        record = {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "consumed_tokens": consumed_samples * self.cfg.training.seq_length,
            "loss": s["loss_sum"] / max(s["n_valid"], 1),
            "selected_loss": s["selected_loss_sum"] / max(s["n_selected"], 1),
            "selected_fraction": s["n_selected"] / max(s["n_valid"], 1),
            "n_selected": int(s["n_selected"]),
            "excess_loss": s["excess_sum"] / s["n_scored"] if s["n_scored"] else math.nan,
            "ratio": ratio,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "step_seconds": seconds,
            "tokens_per_second": self.tokens_per_step / seconds,
        }
        record["tflops_per_device"] = self.flops_per_step / seconds / self.world / 1e12
        if self.peak:
            record["mfu"] = record["tflops_per_device"] / self.peak
        if self.loss_file:
            self.loss_file.write(json.dumps(record) + "\n")
            self.loss_file.flush()
        if self.tb:
            for key in (
                "loss",
                "selected_loss",
                "selected_fraction",
                "excess_loss",
                "lr",
                "grad_norm",
                "tokens_per_second",
                "tflops_per_device",
            ):
                if not math.isnan(record[key]):
                    self.tb.add_scalar(f"slm/{key}", record[key], iteration)
            if last is not None and ref is not None:
                excess = (last.loss - ref.t().float()).flatten()
                excess = excess[torch.isfinite(excess)]
                if excess.numel():
                    self.tb.add_histogram("slm/excess_loss_all", excess.detach().cpu(), iteration)
                    chosen = (last.loss - ref.t().float())[last.selected]
                    chosen = chosen[torch.isfinite(chosen)]
                    if chosen.numel():
                        self.tb.add_histogram("slm/excess_loss_selected", chosen.cpu(), iteration)
        self._window.append(record)
        if iteration % self.cfg.logging.log_interval == 0 or iteration == self.sizes.train_iters:
            self._console(iteration)

    def _console(self, iteration):
        w, self._window = self._window, []
        mean = lambda k: sum(r[k] for r in w) / len(w)
        secs = sum(r["step_seconds"] for r in w)
        excess = mean("excess_loss")
        excess_text = "n/a" if math.isnan(excess) else f"{excess:.4f}"
        line = (
            f"iter {iteration:>7d}/{self.sizes.train_iters} | "
            f"tokens {w[-1]['consumed_tokens']:,} | "
            f"loss {mean('loss'):.4f} | sel. loss {mean('selected_loss'):.4f} | "
            f"sel. {mean('selected_fraction'):.3f} | excess {excess_text} | "
            f"lr {w[-1]['lr']:.3e} | grad norm {mean('grad_norm'):.3f} | "
            f"{self.tokens_per_step * len(w) / secs:,.0f} tok/s | "
            f"{self.flops_per_step * len(w) / secs / self.world / 1e12:.2f} TFLOP/s/dev"
        )
        if self.peak:
            line += f" | MFU {mean('mfu') * 100:.1f}%"
        print(line, flush=True)

    def validation(self, iteration, loss):
        if not self.is_writer or loss is None:
            return
        print(
            f"validation at iter {iteration}: loss {loss:.4f} | ppl {math.exp(min(loss, 50)):.2f}"
        )
        if self.tb:
            self.tb.add_scalar("slm/validation_loss", loss, iteration)
            self.tb.add_scalar("slm/validation_ppl", math.exp(min(loss, 50)), iteration)
        if self.loss_file:
            self.loss_file.write(
                json.dumps({"iteration": iteration, "validation_loss": loss}) + "\n"
            )

    def close(self):
        if self.tb:
            self.tb.flush()
            self.tb.close()
        if self.loss_file:
            self.loss_file.close()
