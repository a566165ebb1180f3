"""Draw the next round's batches from a frozen model's batch losses (RethinkTinyLM).

``p = softmax(l / T)`` over the ``N`` batch losses, then ``N0 = round(keep * N)`` batches without
replacement: exactly ``torch.multinomial(p, N0, replacement=False, generator=g)`` with
``g = torch.Generator().manual_seed(seed)`` (float64 probabilities on the CPU). Batches stay whole,
and the list keeps the draw's order (the next round trains on them in that order). This is
successive sampling: the first pick has probability ``p_i``, each later one is proportional to
``p_i`` among the batches not yet drawn, so the inclusion probability of a batch is not
``N0 * p_i`` (tests compare against the exact one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_slm.data.sample_list import SampleListError, read_batch_losses, write_batch_list
from megatron_slm.tinylm.rounds_config import ResampleConfig


def kept_count(n: int, keep: float) -> int:
    return min(n, max(1, int(round(keep * n))))


def draw_batches(losses: np.ndarray, keep: float, temperature: float, seed: int) -> list[int]:
    """Batch ids drawn without replacement with probability ``softmax(losses / temperature)``."""
    logits = torch.as_tensor(np.asarray(losses, dtype=np.float64)) / temperature
    p = torch.softmax(logits, dim=0)
    generator = torch.Generator().manual_seed(seed)
    n0 = kept_count(len(p), keep)
    return torch.multinomial(p, n0, replacement=False, generator=generator).tolist()


def _summary(values: np.ndarray) -> dict:
    q = np.quantile(values, [0.1, 0.5, 0.9])
    return {
        "count": int(len(values)),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "p10": float(q[0]),
        "median": float(q[1]),
        "p90": float(q[2]),
        "max": float(values.max()),
    }


@dataclass
class ResampleReport:
    output: str
    batches: int
    kept: int
    all: dict
    chosen: dict

    def format(self) -> str:
        def row(name, s):
            return (
                f"  {name:<5} {s['count']:>8} {s['mean']:8.4f} {s['std']:8.4f} {s['min']:8.4f} "
                f"{s['p10']:8.4f} {s['median']:8.4f} {s['p90']:8.4f} {s['max']:8.4f}"
            )

        head = "         batches     mean      std      min      p10   median      p90      max"
        return "\n".join(
            [
                f"kept {self.kept} of {self.batches} batches ({self.kept / self.batches:.1%}) "
                f"-> {self.output}",
                "batch loss:",
                head,
                row("all", self.all),
                row("kept", self.chosen),
            ]
        )


def resample(config: ResampleConfig) -> ResampleReport:
    """Read ``--losses``, draw, write ``--output`` (atomically) with the source record."""
    losses = read_batch_losses(config.losses)
    batch_losses = losses.batch_losses()
    if not np.isfinite(batch_losses).all():
        raise SampleListError(f"--losses {losses.path}: some batch losses are not finite")
    chosen = draw_batches(batch_losses, config.keep, config.temperature, config.seed)
    report = ResampleReport(
        config.output,
        len(batch_losses),
        len(chosen),
        _summary(batch_losses),
        _summary(batch_losses[chosen]),
    )
    write_batch_list(
        config.output,
        losses.source,
        chosen,
        draw={
            "losses": losses.path,
            "keep": config.keep,
            "temperature": config.temperature,
            "seed": config.seed,
            "model": losses.meta.get("model", {}).get("load"),
        },
        report={"all": report.all, "kept": report.chosen},
    )
    return report
