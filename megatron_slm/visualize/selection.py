"""Per-document token losses, reference losses and the trainer's selection.

A document ``d`` of ``N`` tokens (cut to ``max_tokens + 1``) is one row: inputs ``d[:-1]``,
labels ``d[1:]``. Each shown token is a label, with

- ``loss``: the model's loss of it given the tokens before it in the document (shared runtime),
- ``ref``: the reference loss, from the dataset's sidecar (value at the token's position) or from
  an online reference model (``runtime.reference``: the trainer's own), NaN if unscored,
- ``selected``: the selective op's mask on the model's logits with the trainer's settings
  (``runtime.selective_losses``: the very call ``training.slm_loss`` makes), one document = one
  selection group. In training the group is the micro-batch (``--slm-select-scope``), so the
  threshold there mixes documents; the marks here answer "which tokens of this document rank in
  its top ``ratio``".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_slm.errors import UserError
from megatron_slm.ops.selection import selects_everything


class VisualizeError(UserError):
    """Bad input for a selection picture, with a message naming the flag or file at fault."""


@dataclass
class DocumentSelection:
    """One document's shown tokens (labels 1..n of the document) and their numbers."""

    doc: int
    context: str  # text of the document's first token (input only: it has no loss)
    tokens: list[str]  # [n] text of each shown token
    loss: np.ndarray  # [n] float32
    ref: np.ndarray  # [n] float32, NaN = unscored / no reference
    selected: np.ndarray  # [n] bool
    truncated: bool = False
    source: str = ""  # dataset prefix (or a training-sample label)
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        self.excess = self.loss - self.ref
        self.stats = self.stats or document_stats(self.loss, self.ref, self.selected)


def _mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def document_stats(loss: np.ndarray, ref: np.ndarray, selected: np.ndarray) -> dict:
    """Share selected, mean loss / reference loss, mean excess of all, selected, unselected."""
    excess = loss - ref
    n = int(loss.size)
    return {
        "tokens": n,
        "selected": int(selected.sum()),
        "selected_share": float(selected.sum()) / n if n else float("nan"),
        "mean_loss": _mean(loss),
        "mean_ref_loss": _mean(ref),
        "mean_excess": _mean(excess),
        "mean_excess_selected": _mean(excess[selected]),
        "mean_excess_unselected": _mean(excess[~selected]),
    }


def token_texts(tokenizer, ids) -> list[str]:
    """Text each id adds to the decoded sequence: ``decode(ids[:i + 1])`` minus ``decode(ids[:i])``
    (keeps the spaces a tokenizer puts between pieces), else the id decoded alone, else ``<id>``.
    Quadratic in the length, which stays a few hundred tokens here."""
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [f"{i} " for i in ids]
    out, prev = [], ""
    for n, i in enumerate(ids, start=1):
        try:
            text = tokenizer.detokenize(ids[:n])
            piece = text[len(prev) :] if text.startswith(prev) else tokenizer.detokenize([i])
        except Exception:  # noqa: BLE001 - tokenizers differ in what they refuse (special ids)
            text, piece = prev, f"<{i}>"
        out.append(piece if piece else f"<{i}>")
        prev = text
    return out


@dataclass
class SelectionSettings:
    """The trainer's selection flags (--slm-ratio, --slm-select-mode, --slm-unscored)."""

    ratio: float = 0.6
    mode: str = "excess"
    unscored: str = "keep"
    seed: int = 0

    def op_kwargs(self, has_ref: bool) -> dict:
        mode = self.mode
        if selects_everything(self.ratio, mode, has_ref):
            mode = "loss"  # as training.slm_loss: ratio 1 needs no reference
        # One row = one group: "sequence" and "microbatch" are the same selection here.
        return dict(ratio=self.ratio, scope="sequence", mode=mode, unscored=self.unscored,
                    seed=self.seed)  # fmt: skip


def select_row(lm, ids: np.ndarray, ref: np.ndarray | None, settings: SelectionSettings):
    """``ids [n + 1]`` one document (row), ``ref [n]`` reference loss of ``ids[1:]`` or None ->
    (loss [n], selected [n]) numpy, by the selective op on the model's logits."""
    from megatron_slm.runtime import selective_losses
    from megatron_slm.runtime.forward import Rows

    t = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]  # [1, n + 1]
    batch = Rows.causal(t[:, :-1], t[:, 1:])
    ref_t = None if ref is None else torch.as_tensor(np.asarray(ref, dtype=np.float32))[None]
    loss, selected = selective_losses(
        lm, batch, ref_loss=ref_t, **settings.op_kwargs(ref is not None)
    )
    return loss[0].cpu().numpy(), selected[0].cpu().numpy().astype(bool)
