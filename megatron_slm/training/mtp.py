"""Multi-token prediction (``--mtp-num-layers``, DeepSeek-V3's): the loss of megatron-core's MTP
heads beside the trained model's own.

megatron-core's ``GPTModel`` computes each head's per-token loss through the same hook as the main
loss (``compute_language_model_loss``), the heads first, in order, the main loss last, and adds
``factor / N * loss * rolled loss mask`` to the backward itself (``MTPLossAutoScaler``, scaled by
the schedule like the main loss). The trainer's hook is the selective op, the distillation
wrapper or the plain fused loss, each of which expects one call per micro-batch; this wrapper
gives the heads' calls to the plain loss and keeps their detached losses for the log.

With per-token normalisation the heads' sums are divided by the step's trained tokens: under
Rho-1's selection that is the selected count, so the trainer weighs the heads by the step's ratio
(as the mixture's auxiliary losses), keeping their share what --mtp-loss-scaling-factor says.

Rows of several documents (``--reset-attention-mask``, ``--sft-data``): head k at position t joins
t's hidden state with the token k ahead and predicts the label k ahead, so where t + k lies in
the next document it would learn across the boundary. Its loss there is zeroed (before
megatron-core's mask multiplies it, so the backward and the logged sums agree): a packed row
trains the heads as its documents alone would. Attention needs nothing more: where t + k is in
t's document, every key t' <= t of that document has t' + k in it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_mask(loss_mask: torch.Tensor, k: int) -> torch.Tensor:
    """``[b, s]`` loss mask of the head that predicts ``k`` tokens further than the main head:
    position t weighs target t + k, the last k positions none (megatron-core's roll)."""
    return F.pad(loss_mask[:, k:], (0, k))


def same_document(documents: torch.Tensor, k: int) -> torch.Tensor:
    """``[b, s]`` bool: position t and position t + k lie in one document (``documents``: each
    position's document index, ``[b, s]``); the last k positions False."""
    return F.pad(documents[:, k:] == documents[:, :-k], (0, k))


class MultiTokenPrediction:
    def __init__(self, num_layers: int, head_loss):
        """``head_loss(labels [b, s], logits [s, b, v/tp]) -> [b, s]``: the heads' loss."""
        self.num_layers, self.head_loss = num_layers, head_loss
        self._losses: list[torch.Tensor] = []
        self._documents: torch.Tensor | None = None

    def prepare(self, documents: torch.Tensor | None) -> None:
        """The next forward's document index per position (``[b, s]``), or None: one document
        per row (nothing to cut)."""
        self._documents = documents

    def _within_documents(self, loss: torch.Tensor, k: int) -> torch.Tensor:
        if self._documents is None:
            return loss
        return loss * same_document(self._documents, k).to(loss.dtype)

    def install(self, model) -> None:
        """Wrap ``model``'s loss hook (the last stage's GPTModel, its loss already installed)."""
        main = model.compute_language_model_loss

        def compute_language_model_loss(labels, logits):
            if len(self._losses) < self.num_layers:  # (megatron-core: the heads come first)
                k = len(self._losses) + 1
                loss = self._within_documents(self.head_loss(labels, logits), k)
                self._losses.append(loss.detach())
                return loss
            return main(labels, logits)

        model.compute_language_model_loss = compute_language_model_loss
        model.register_forward_pre_hook(lambda *_: self._losses.clear())

    def statistics(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """The last forward's heads: ``[2 * N]`` float64, each head's loss summed over its
        tokens, then their counts (on the device)."""
        losses, self._losses = self._losses, []
        if len(losses) != self.num_layers:
            raise RuntimeError(
                f"{len(losses)} MTP losses from the forward, {self.num_layers} heads"
            )
        mask = loss_mask.to(torch.float64)
        masks = [
            self._within_documents(shifted_mask(mask, k), k) for k in range(1, self.num_layers + 1)
        ]
        sums = [(loss.to(torch.float64) * m).sum() for loss, m in zip(losses, masks)]
        return torch.stack(sums + [m.sum() for m in masks])
