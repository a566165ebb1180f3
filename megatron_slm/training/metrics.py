"""Console lines, TensorBoard scalars/histograms and the per-step JSON log of the trainer.

Statistics are summed over micro-batches and data-parallel ranks on the last pipeline stage; the
global last rank (last stage) writes, as in Megatron-LM.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_slm.models.presets import GPTModelConfig
from megatron_slm.training.config import DerivedSizes, PretrainConfig
from megatron_slm.training.scalar_writers import ScalarWriters, WandbWriter, run_config

logger = logging.getLogger("megatron_slm")

# Order of the per-micro-batch statistics vector: the selective op's stats, then the excess loss
# of the selected and unselected tokens that have a reference (measured in every mode when a
# reference is at hand), then (blends) per-source valid and selected token counts, then (with a
# distillation teacher) the KD loss summed over the trained tokens and their count.
OP_STAT_KEYS = ("loss_sum", "n_valid", "selected_loss_sum", "n_selected", "excess_sum", "n_scored")
EXCESS_KEYS = ("excess_sel_sum", "n_excess_sel", "excess_unsel_sum", "n_excess_unsel")
STAT_KEYS = OP_STAT_KEYS + EXCESS_KEYS
KD_STATS = ("kd_loss_sum", "n_kd")


def excess_split(loss, ref, loss_mask, selected) -> torch.Tensor:
    """``[4]``: excess sum and count over selected, then unselected valid tokens with a finite
    reference (all zero without ``ref``). All ``[b, s]``."""
    if ref is None:
        return torch.zeros(4, device=loss.device)
    excess = loss.float() - ref.float()
    has = torch.isfinite(excess) & loss_mask.bool()
    parts = []
    for group in (has & selected, has & ~selected):
        parts += [torch.where(group, excess, torch.zeros_like(excess)).sum(), group.sum().float()]
    return torch.stack(parts)


def source_counts(valid, selected, source, n_sources: int) -> torch.Tensor:
    """``[2 * n_sources]``: valid then selected token counts of each blend source (``source [b]``
    = the sample's dataset index in the blend); zeros when the batch has no source ids."""
    if source is None:
        return torch.zeros(2 * n_sources, device=valid.device)
    src = source.to(valid.device, non_blocking=True).long()  # pinned by the loader: no wait
    # (a one-hot product rather than index_add_, whose CUDA kernel adds atomically: not
    # reproducible, refused under --deterministic-mode)
    which = (src[:, None] == torch.arange(n_sources, device=src.device)).float()  # [b, sources]
    per_sample = torch.stack([valid.float().sum(dim=1), selected.float().sum(dim=1)])  # [2, b]
    return (per_sample @ which).flatten()


def moe_aux_losses(
    read: bool, num_microbatches: int, moe_layers: tuple[bool, ...], per_layer: bool = False
) -> dict[str, torch.Tensor]:
    """This step's mixture-of-experts auxiliary losses as Megatron-LM logs them (megatron-core's
    tracker sums each layer's over the micro-batches; here the mean over the layers with a
    mixture, ``moe_layers``, and the micro-batches, 0-dim device tensors named ``moe_<loss>``;
    a dense layer's entry stays 0; ``per_layer``: each mixture's mean over the micro-batches
    too, ``moe_<loss>_layer_<i>``), then the tracker is cleared for
    the next step. ``read`` (log steps): the layers' values are first reduced over the pipeline
    stages and data-parallel ranks, collectives every rank takes part in; else only cleared."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    out = {}
    if read:
        reduce_aux_losses_tracker_across_ranks()
        for name, entry in get_moe_layer_wise_logging_tracker().items():
            # The z-loss: megatron-core leaves each TP shard's and DP rank's own value; their
            # mean is the whole batch's.
            if entry.get("reduce_group") is None:
                group = parallel_state.get_tensor_and_data_parallel_group()
                dist.all_reduce(entry["values"], group=group, op=dist.ReduceOp.AVG)
            values = entry["values"].float() / num_microbatches
            out[f"moe_{name}"] = values.sum() / sum(moe_layers)
            for i in (i for i, moe in enumerate(moe_layers) if moe and per_layer):
                out[f"moe_{name}_layer_{i}"] = values[i]
    clear_aux_losses_tracker()
    return out


# Dense bf16 peak TFLOP/s per device, for MFU (by substring of the device name).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def nanmean(window: list[dict], key: str) -> float:
    values = [r[key] for r in window if not math.isnan(r[key])]
    return sum(values) / len(values) if values else math.nan


@torch.no_grad()
def params_norm(chunks) -> torch.Tensor:
    """Megatron-LM's ``calc_params_l2_norm`` on the device: the L2 norm of the model's weights
    in fp32, each tensor-parallel duplicate once, summed over the model-parallel ranks."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    params = [
        p for c in chunks for p in c.parameters() if param_is_not_tensor_parallel_duplicate(p)
    ]
    norms = [torch.linalg.vector_norm(p, dtype=torch.float32) for p in params]
    total = torch.stack(norms).square().sum() if norms else torch.zeros(())
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return total.sqrt()


def memory_record(device: torch.device) -> dict[str, int]:
    """This process's memory (--log-memory-to-tensorboard): the CUDA allocator's bytes, or on CPU
    the peak resident set."""
    if device.type == "cuda":
        return {
            "mem_allocated_bytes": torch.cuda.memory_allocated(device),
            "mem_reserved_bytes": torch.cuda.memory_reserved(device),
            "mem_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
        }
    import resource

    return {"mem_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


@dataclass
class _Pending:
    """One step whose device values the host has not read yet."""

    iteration: int
    # [len(STAT_KEYS) (+ 2 * sources) (+ 2 * MTP heads) (+ KD_STATS)] float64, on the device
    stats: torch.Tensor
    grad_norm: torch.Tensor | None  # 0-dim, on the device
    lr: float
    consumed_samples: int
    ratio: float | None
    global_batch: int
    extras: dict[str, torch.Tensor]  # log steps: params_norm, num_zeros_in_grad (device)


_TB_KEYS = (
    "loss",
    "selected_loss",
    "selected_fraction",
    "excess_loss",
    "excess_selected",
    "excess_unselected",
    "lr",
    "grad_norm",
    "tokens_per_second",
    "tflops_per_device",
)


class TrainingLogger:
    """Keeps each step's statistics on the device and reads them back at log steps.

    :meth:`step` costs no host synchronisation: it keeps the step's device tensors. :meth:`read`
    copies every pending step back with one transfer, writes their per-step records (JSON log,
    TensorBoard) and starts a new timing segment; the trainer calls it at log steps (through
    :meth:`log`) and before work that is not a training step (evaluation, checkpoints, selection
    pictures), then :meth:`restart_clock` after it. A step's ``step_seconds`` is the mean over
    the steps read together: the device runs ahead of the host, so only the wall time between
    two reads (each waits for the device) measures the steps in between.
    """

    def __init__(
        self,
        cfg: PretrainConfig,
        arch: GPTModelConfig,
        sizes: DerivedSizes,
        device: torch.device,
        sources: list[str] | None = None,
        distilling: bool = False,
        mtp_layers: int = 0,
    ):
        self.cfg, self.sizes, self.device = cfg, sizes, device
        self.sources = sources if sources and len(sources) > 1 else []
        self.distilling = distilling  # the statistics end with KD_STATS
        self.mtp_layers = mtp_layers  # before them: each head's loss sum, then its tokens
        self.world = dist.get_world_size()
        self.is_writer = dist.get_rank() == self.world - 1
        self.flops_per_token = arch.flops_per_token(cfg.training.seq_length, mtp_layers)
        lg = cfg.logging  # the record's values that go to TensorBoard (flags add some)
        optional = {
            "params_norm": lg.log_params_norm,
            "num_zeros_in_grad": lg.log_num_zeros_in_grad,
            "step_seconds": lg.log_timers_to_tensorboard,
            "global_batch_size": lg.log_batch_size_to_tensorboard,
        }
        optional["kd_loss"] = distilling
        optional.update({f"mtp_{k}_loss": True for k in range(1, mtp_layers + 1)})
        self.tb_keys = _TB_KEYS + tuple(key for key, wanted in optional.items() if wanted)
        self.peak = device_peak_tflops(device)
        self.tb = None  # histograms and pictures go to TensorBoard only
        writers = []
        if self.is_writer and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                cfg.logging.tensorboard_dir, max_queue=cfg.logging.tensorboard_queue_size
            )
            writers.append(self.tb)
        if self.is_writer and cfg.logging.wandb_project:
            writers.append(WandbWriter(cfg.logging, cfg.checkpoint.save, run_config(cfg)))
        self.scalars = ScalarWriters(writers)  # the same scalars to each
        self.loss_file = (
            open(cfg.logging.log_loss_file, "a")
            if self.is_writer and cfg.logging.log_loss_file
            else None
        )
        self._pending: list[_Pending] = []
        self._window: list[dict] = []  # records read since the last console line
        self._clock = time.perf_counter()

    def is_log_step(self, iteration: int) -> bool:
        return iteration % self.cfg.logging.log_interval == 0 or iteration == self.sizes.train_iters

    def restart_clock(self) -> None:
        """Start a timing segment (after work that is not a training step)."""
        self._clock = time.perf_counter()

    def step(
        self, iteration, stats, grad_norm, lr, consumed_samples, ratio, global_batch, extras
    ) -> None:
        """Keep this step's device values (``stats`` None: not the last pipeline stage);
        ``global_batch``: the step's samples (a ramp's may be under --global-batch-size);
        ``extras``: more 0-dim device values for the record (--log-params-norm, ...)."""
        if self.is_writer and stats is not None:
            self._pending.append(_Pending(iteration, stats, grad_norm, lr, consumed_samples,
                                          ratio, global_batch, extras))  # fmt: skip

    def log(self, iteration, last=None, ref=None) -> None:
        """A log step: read the pending steps, histograms of this step's selection, console."""
        self.read()
        if self.tb and last is not None and ref is not None and self._tb_step(iteration):
            self._histograms(iteration, last, ref)
        if self._window:
            self._console(iteration)

    def read(self) -> None:
        """Read the pending steps back (one host synchronisation) and write their records."""
        if not self._pending:
            self.restart_clock()
            return
        pending, self._pending = self._pending, []
        nan = torch.full((), math.nan, dtype=torch.float64, device=pending[0].stats.device)
        norms = [nan if p.grad_norm is None else p.grad_norm.to(torch.float64) for p in pending]
        rows = torch.cat([torch.stack([p.stats for p in pending]), torch.stack(norms)[:, None]], 1)
        values = rows.tolist()  # the one device -> host read of the window
        now = time.perf_counter()
        elapsed, self._clock = now - self._clock, now
        seconds = elapsed / len(pending)
        # The steps read together share the window's rate (their batches may differ on a ramp).
        tokens_per_second = sum(p.global_batch for p in pending) * self._seq / elapsed
        for p, row in zip(pending, values):
            self._write(self._record(p, row[:-1], row[-1], seconds, tokens_per_second))

    @property
    def _seq(self) -> int:
        return self.cfg.training.seq_length

    def _record(self, p: _Pending, values: list[float], grad_norm: float, seconds: float,
                tokens_per_second: float) -> dict:  # fmt: skip
        s = dict(zip(STAT_KEYS, values))
        mean = lambda key, n: s[key] / s[n] if s[n] else math.nan  # noqa: E731
        record = {
            "iteration": p.iteration,
            "consumed_samples": p.consumed_samples,
            "consumed_tokens": p.consumed_samples * self._seq,
            "global_batch_size": p.global_batch,
            "loss": s["loss_sum"] / max(s["n_valid"], 1),
            "selected_loss": s["selected_loss_sum"] / max(s["n_selected"], 1),
            "selected_fraction": s["n_selected"] / max(s["n_valid"], 1),
            "n_selected": int(s["n_selected"]),
            # Mean excess over every valid token with a reference (NaN: no reference at hand).
            "excess_loss": (s["excess_sel_sum"] + s["excess_unsel_sum"])
            / (s["n_excess_sel"] + s["n_excess_unsel"])
            if s["n_excess_sel"] + s["n_excess_unsel"]
            else math.nan,
            "excess_selected": mean("excess_sel_sum", "n_excess_sel"),
            "excess_unselected": mean("excess_unsel_sum", "n_excess_unsel"),
            "ratio": p.ratio,
            "lr": p.lr,
            "grad_norm": grad_norm,
            "step_seconds": seconds,
            "tokens_per_second": tokens_per_second,
        }
        if self.sources:
            k = len(self.sources)
            valid, chosen = (
                values[len(STAT_KEYS) : len(STAT_KEYS) + k],
                values[len(STAT_KEYS) + k : len(STAT_KEYS) + 2 * k],
            )
            record["selected_fraction_by_source"] = {
                name: c / v if v else math.nan for name, v, c in zip(self.sources, valid, chosen)
            }
        if self.mtp_layers:  # each head's mean loss over the tokens it predicts
            n = self.mtp_layers
            at = len(STAT_KEYS) + 2 * len(self.sources)
            sums, counts = values[at : at + n], values[at + n : at + 2 * n]
            for k, (total, count) in enumerate(zip(sums, counts), 1):
                record[f"mtp_{k}_loss"] = total / count if count else math.nan
        if self.distilling:  # KL(teacher || student), mean over the trained tokens
            kd_sum, n_kd = values[-len(KD_STATS) :]
            record["kd_loss"] = kd_sum / n_kd if n_kd else math.nan
        record["tflops_per_device"] = self.flops_per_token * tokens_per_second / self.world / 1e12
        if self.peak:
            record["mfu"] = record["tflops_per_device"] / self.peak
        for key, value in p.extras.items():  # (log steps only: the device has caught up)
            record[key] = value.item() if value.is_floating_point() else int(value)
        if self.cfg.logging.log_memory_to_tensorboard and self.is_log_step(p.iteration):
            record.update(memory_record(self.device))
        return record

    def _write(self, record: dict) -> None:
        iteration = record["iteration"]
        if self.loss_file:
            self.loss_file.write(json.dumps(record) + "\n")
            self.loss_file.flush()
        if self.scalars and self._tb_step(iteration):
            add = self.scalars.add_scalar
            for key in self.tb_keys:
                if key in record and not math.isnan(record[key]):
                    add(f"slm/{key}", record[key], iteration)
            for key in record:
                if key.startswith("mem_"):
                    add(f"slm/memory/{key[4:]}", record[key], iteration)
                if key.startswith("moe_"):
                    add(f"slm/moe/{key[4:]}", record[key], iteration)
            if self.cfg.logging.log_world_size_to_tensorboard:
                add("slm/world_size", self.world, iteration)
            for name, share in record.get("selected_fraction_by_source", {}).items():
                if not math.isnan(share):
                    add(f"slm/selected_fraction_by_source/{name}", share, iteration)
        self._window.append(record)

    def _tb_step(self, iteration: int) -> bool:
        return iteration % self.cfg.logging.tensorboard_log_interval == 0

    def _histograms(self, iteration, last, ref) -> None:
        """Excess loss of the step's last micro-batch: all valid tokens, and the selected ones."""
        excess = (last.loss - ref.t().float()).flatten()
        excess = excess[torch.isfinite(excess)]
        if excess.numel():
            self.tb.add_histogram("slm/excess_loss_all", excess.detach().cpu(), iteration)
            chosen = (last.loss - ref.t().float())[last.selected]
            chosen = chosen[torch.isfinite(chosen)]
            if chosen.numel():
                self.tb.add_histogram("slm/excess_loss_selected", chosen.cpu(), iteration)

    def _console(self, iteration):
        w, self._window = self._window, []
        mean = lambda k: sum(r[k] for r in w) / len(w)
        secs = sum(r["step_seconds"] for r in w)
        rate = sum(r["global_batch_size"] for r in w) * self._seq / secs  # tokens/s
        fmt = lambda x: "n/a" if math.isnan(x) else f"{x:.4f}"  # noqa: E731
        excess_text = (
            f"{fmt(nanmean(w, 'excess_selected'))} / {fmt(nanmean(w, 'excess_unselected'))}"
        )
        line = (
            f"iter {iteration:>7d}/{self.sizes.train_iters} | "
            f"tokens {w[-1]['consumed_tokens']:,} | "
            f"loss {mean('loss'):.4f} | sel. loss {mean('selected_loss'):.4f} | "
            f"sel. {mean('selected_fraction'):.3f} | excess sel./unsel. {excess_text} | "
            + (f"kd loss {fmt(nanmean(w, 'kd_loss'))} | " if self.distilling else "")
            + "".join(
                f"mtp_{k} loss {fmt(nanmean(w, f'mtp_{k}_loss'))} | "
                for k in range(1, self.mtp_layers + 1)
            )
            + f"lr {w[-1]['lr']:.3e} | grad norm {mean('grad_norm'):.3f} | "
            f"{rate:,.0f} tok/s | "
            f"{self.flops_per_token * rate / self.world / 1e12:.2f} TFLOP/s/dev"
        )
        if self.sizes.batch_schedule is not None:
            line += f" | global batch {w[-1]['global_batch_size']}"
        if "params_norm" in w[-1]:
            line += f" | params norm {w[-1]['params_norm']:.3f}"
        if "num_zeros_in_grad" in w[-1]:
            line += f" | zeros in grad {w[-1]['num_zeros_in_grad']:,}"
        for key in (k for k in w[-1] if k.startswith("moe_") and "_layer_" not in k):
            line += f" | {key[4:].replace('_', ' ')} {w[-1][key]:.4f}"
        if self.peak:
            line += f" | MFU {mean('mfu') * 100:.1f}%"
        print(line, flush=True)

    def selection_image(self, iteration, last, ref, labels, tokenizer, max_tokens=256):
        """TensorBoard image of the first sample of the step's last micro-batch: its tokens
        coloured by excess loss, the selected ones underlined (``megatron_slm.visualize``)."""
        if not self.tb or last is None or labels is None:
            return
        import numpy as np

        from megatron_slm.visualize.png import render_rgb
        from megatron_slm.visualize.selection import DocumentSelection, token_texts

        n = min(max_tokens, labels.shape[1])
        loss = last.loss[:n, 0].detach().float().cpu().numpy()  # [s, b] -> first sample
        ref_np = ref[0, :n].float().cpu().numpy() if ref is not None else np.full(n, np.nan)
        sample = DocumentSelection(
            doc=0,
            context="",
            tokens=token_texts(tokenizer, labels[0, :n].cpu().tolist()),
            loss=loss,
            ref=ref_np.astype(np.float32),
            selected=last.selected[:n, 0].cpu().numpy().astype(bool),
            truncated=n < labels.shape[1],
        )
        image = render_rgb([sample], title=f"training sample, step {iteration}")
        self.tb.add_image("slm/selection", image, iteration, dataformats="HWC")

    def validation(self, iteration, losses: dict[str, float], split: str = "validation"):
        """``losses``: per validation set (``Trainer.evaluate``), or of the test split
        (``split="test"``); ``""`` names the only one, logged as before there were several."""
        if not self.is_writer or not losses:
            return
        ppl = {name: math.exp(min(loss, 50)) for name, loss in losses.items()}
        if set(losses) == {""}:
            shown = f"loss {losses['']:.4f} | ppl {ppl['']:.2f}"
        else:
            shown = " | ".join(
                f"{name} loss {loss:.4f}, ppl {ppl[name]:.2f}" for name, loss in losses.items()
            )
        print(f"{split} at iter {iteration}: {shown}")
        for name, loss in losses.items():
            suffix = f"/{name}" if name else ""
            self.scalars.add_scalar(f"slm/{split}_loss{suffix}", loss, iteration)
            self.scalars.add_scalar(f"slm/{split}_ppl{suffix}", ppl[name], iteration)
        if self.loss_file:
            record = {"iteration": iteration}
            if set(losses) == {""}:
                record[f"{split}_loss"] = losses[""]
            else:
                record[f"{split}_losses"] = losses
            self.loss_file.write(json.dumps(record) + "\n")

    def close(self, iteration: int) -> None:
        """Write what is still pending (a run stopped between log steps), then close."""
        self.read()
        if self._window:
            self._console(iteration)
        self.scalars.flush()
        self.scalars.close()
        if self.loss_file:
            self.loss_file.close()
