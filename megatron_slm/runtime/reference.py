"""The online reference model: a frozen copy evaluated per micro-batch, without gradients (the
trainer's ``--slm-ref-source online`` and the selection report's ``--slm-ref-load``).

It gives the same values the offline scorer writes into a sidecar, so ``--slm-ref-source online``
and ``sidecar`` select the same tokens: attention is reset at every end-of-document token (each
document sees only itself, like the scorer's packed rows), position ids count from each document's
start (as the scorer's do: a learned position table reads them; RoPE is relative, so for it the
offset of a document inside the row does not matter), and a label that is the first token of a
document gets NaN (no context, like position 0 of a sidecar document).

The one difference (the "first-token convention"): a document that began before this sample
starts is seen from the sample's first token only, while the scorer saw it from its true start.
"""

from __future__ import annotations

import torch

from megatron_slm.models.document_mask import DocumentMask
from megatron_slm.runtime.forward import Rows, per_token_losses
from megatron_slm.runtime.loader import load_model
from megatron_slm.runtime.plan import LoadPlan


class OnlineReference:
    """The frozen reference model of ``--slm-ref-load``, loaded by the shared runtime at the
    trainer's TP (its architecture and padded vocabulary are its own checkpoint's)."""

    def __init__(self, plan: LoadPlan, device, params_dtype, eod: int):
        # ``plan``: runtime.plan_load of --slm-ref-load, made (and its vocabulary checked against
        # the data's tokenizer) before any work.
        self.model = load_model(plan, device, params_dtype=params_dtype, documents=plan.flag)
        self.eod = eod

    @torch.no_grad()
    def per_token_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """tokens, labels [b, s] -> reference loss of each label [b, s] (fp32, NaN: no context)."""
        # The documents themselves, not an s x s mask: FlexAttention on CUDA (models.document_mask).
        documents = DocumentMask.from_tokens(tokens, self.eod)
        batch = Rows(tokens, labels, documents.positions(), documents)
        (loss,) = per_token_losses(self.model, [batch])
        # The label after an end-of-document token starts a new document: nothing to condition on.
        return loss.masked_fill(tokens == self.eod, float("nan"))
