"""Token-loss dynamics across checkpoints: the four Rho-1 categories.

Rho-1 (Lin et al. 2024, Fig. 2) follows each token's loss through training and splits tokens by
whether their loss is *high* or *low* at the first and at the last checkpoint: H->H (stays hard,
often noise), L->H (forgotten / rising), H->L (learned: the tokens worth training on), L->L (already
known). Here a loss is high when it is strictly above the threshold ``theta`` (nats), low otherwise
(``<= theta``); ``theta`` defaults to the median loss of the followed tokens at the first
checkpoint, and can be set with ``--threshold``. A token's category uses only the first and the
last checkpoint; the curves are each category's mean loss at every checkpoint.

The same split restricted to the tokens an SLM run selects and to those it does not (the
selective op with the dataset's sidecar, see :mod:`.selection`) shows what the selection keeps.
"""

from __future__ import annotations

import io
import re

import numpy as np

CATEGORIES = ("H->H", "L->H", "H->L", "L->L")


def categorize(first: np.ndarray, last: np.ndarray, theta: float) -> np.ndarray:
    """Category index (into :data:`CATEGORIES`) of each token: ``[n]`` int8."""
    hi0, hi1 = first > theta, last > theta
    return np.select([hi0 & hi1, ~hi0 & hi1, hi0 & ~hi1], [0, 1, 2], default=3).astype(np.int8)


def category_summary(losses: np.ndarray, theta: float, mask: np.ndarray | None = None) -> dict:
    """``losses [checkpoints, tokens]`` -> per category: count, share, mean loss per checkpoint.
    ``mask [tokens]`` restricts to a subset (shares are of that subset)."""
    if mask is not None:
        losses = losses[:, mask]
    cats = categorize(losses[0], losses[-1], theta)
    n = losses.shape[1]
    out = {}
    for i, name in enumerate(CATEGORIES):
        members = cats == i
        k = int(members.sum())
        out[name] = {
            "count": k,
            "share": k / n if n else float("nan"),
            "mean_loss": losses[:, members].mean(axis=1).tolist() if k else [None] * len(losses),
        }
    return out


def default_threshold(losses: np.ndarray) -> float:
    return float(np.median(losses[0]))


def checkpoint_step(path: str, fallback: int) -> int:
    """The iteration of ``.../iter_0000200`` (the position in the list when not named so)."""
    m = re.search(r"iter_(\d+)/?$", path)
    return int(m.group(1)) if m else fallback


def plot_dynamics(steps, summary: dict, split: dict | None, width: int, height: int) -> bytes:
    """PNG of exactly ``width x height`` pixels: each category's mean loss against the step (left),
    and with a selection split the selected (solid) and unselected (dashed) tokens (right)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    colors = dict(zip(CATEGORIES, ("#b2182b", "#ef8a62", "#2166ac", "#67a9cf")))
    panels = [("all tokens", summary, "-")]
    axes = fig.subplots(1, 2 if split else 1, squeeze=False)[0]
    for ax, (name, summ, _) in zip(axes, panels + ([("SLM selection", None, "")] if split else [])):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_ylabel("mean token loss (nats)", fontsize=8)
        ax.tick_params(labelsize=7)
        groups = [(summ, "-", "")] if summ else [
            (split["selected"], "-", " sel."), (split["unselected"], "--", " unsel.")
        ]  # fmt: skip
        for g, style, suffix in groups:
            for cat in CATEGORIES:
                c = g[cat]
                if c["count"]:
                    ax.plot(steps, c["mean_loss"], style, color=colors[cat], marker="o", ms=3,
                            label=f"{cat}{suffix} ({c['share'] * 100:.0f}%)")  # fmt: skip
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
