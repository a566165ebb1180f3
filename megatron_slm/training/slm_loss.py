"""The selective language-modeling loss inside megatron-core's GPTModel.

GPTModel computes its loss in ``compute_language_model_loss(labels, logits)`` on the last pipeline
stage, with the output layer's logits ``[s, b, v/tp]`` still in hand. :class:`SelectiveLMLoss`
replaces that method on the model chunk, so the fused op sees the logits without a transposed copy
and may write its gradient into them in place (nothing reads the logits after the loss).

The trainer sets the per-micro-batch inputs (reference loss, loss mask, ratio, seed) with
:meth:`SelectiveLMLoss.prepare` right before the forward; the op's outputs of that micro-batch
are in :attr:`SelectiveLMLoss.last` afterwards.

Plain training (no ``--slm-ratio``) runs the same op at ratio 1 (:func:`install_plain_loss`), not
megatron-core's ``vocab_parallel_cross_entropy``: the same per-token loss, but megatron-core
converts the logits to fp32 and keeps their softmax for backward (4 bytes x vocabulary per token,
1 GiB at 8192 tokens x 32000), and on an H200 its forward + backward at [4096, 2, 32000] bf16 took
4.46 ms against the op's 0.44 ms (benchmarks/RESULTS_gpu.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megatron_slm.ops import SelectiveLossOutput, compiled_kernels_for, selective_cross_entropy
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


def plain_loss(impl: str, device: torch.device):
    """``(compute_language_model_loss, what computes it)``: the fused op at ratio 1 when ``impl``
    is ``fused`` and the op has compiled kernels for ``device`` (its pure-PyTorch fallback is no
    faster than megatron-core's); else ``(None, ...)``: keep megatron-core's."""
    if impl == "megatron":
        return None, "megatron-core's vocab_parallel_cross_entropy (--cross-entropy-impl megatron)"
    kernels = compiled_kernels_for(device)
    if kernels is None:
        return None, (
            f"megatron-core's vocab_parallel_cross_entropy (megatron_slm._C has no kernels for "
            f"{device.type}: the fused op would run its pure-PyTorch reference)"
        )
    tp_group = parallel_state.get_tensor_model_parallel_group()

    def compute_language_model_loss(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # labels [b, s], logits [s, b, v/tp] -> [b, s]; nothing reads the logits after the loss,
        # so the gradient is written into them
        out = selective_cross_entropy(
            logits, labels.t(), mode="loss", tp_group=tp_group, inplace_backward=True
        )
        return out.loss.t()

    return compute_language_model_loss, f"the fused op (megatron_slm._C, {kernels} kernels)"


def install_plain_loss(chunk, impl: str, device: torch.device) -> str:
    """Route ``chunk``'s plain loss (last pipeline stage) through :func:`plain_loss`. Returns
    what computes it, for the log."""
    compute, what = plain_loss(impl, device)
    if compute is not None:
        getattr(chunk, "module", chunk).compute_language_model_loss = compute
    return what
