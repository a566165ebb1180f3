"""The selective language-modeling loss inside megatron-core's GPTModel.

GPTModel computes its loss in ``compute_language_model_loss(labels, logits)`` on the last pipeline
stage, with the output layer's logits ``[s, b, v/tp]`` still in hand. :class:`SelectiveLMLoss`
replaces that method on the model chunk, so the fused op sees the logits without a transposed copy
and may write its gradient into them in place (nothing reads the logits after the loss).

The trainer sets the per-micro-batch inputs (reference loss, loss mask, ratio, seed) with
:meth:`SelectiveLMLoss.prepare` right before the forward; the op's outputs of that micro-batch
are in :attr:`SelectiveLMLoss.last` afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megatron_slm.ops import SelectiveLossOutput, selective_cross_entropy
from megatron_slm.ops.selection import selects_everything


@dataclass
class MicroBatchSelection:
    ref_loss: torch.Tensor | None  # [b, s] reference loss of each label (NaN: unscored)
    loss_mask: torch.Tensor  # [b, s]
    ratio: float
    seed: int


class SelectiveLMLoss:
    def __init__(self, scope: str, mode: str, unscored: str):
        self.scope, self.mode, self.unscored = scope, mode, unscored
        self.pending: MicroBatchSelection | None = None
        self.last: SelectiveLossOutput | None = None

    def install(self, chunk) -> None:
        """Route ``chunk``'s loss through the selective op (last pipeline stage only)."""
        model = getattr(chunk, "module", chunk)
        model.compute_language_model_loss = self.compute

    def prepare(self, selection: MicroBatchSelection) -> None:
        self.pending = selection

    def compute(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """labels [b, s], logits [s, b, v/tp] -> per-token loss [b, s] (grad on selected only)."""
        sel, self.pending = self.pending, None
        if sel is None:
            raise RuntimeError("SelectiveLMLoss.prepare() was not called before the forward")
        mode = self.mode
        if selects_everything(sel.ratio, mode, sel.ref_loss is not None):
            mode = "loss"  # ratio 1 selects every valid token; no reference needed
        out = selective_cross_entropy(
            logits,
            labels.t(),  # [s, b]
            ref_loss=sel.ref_loss.t() if sel.ref_loss is not None else None,
            loss_mask=sel.loss_mask.t(),
            ratio=sel.ratio,
            scope=self.scope,
            mode=mode,
            unscored=self.unscored,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_group=parallel_state.get_data_parallel_group()
            if self.scope == "data-parallel"
            else None,
            seed=sel.seed,
            inplace_backward=True,
        )
        self.last = out
        return out.loss.t()  # [b, s]
