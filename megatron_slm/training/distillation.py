"""Knowledge distillation in the trainer (``--export-kd-teacher-load``, Megatron-LM's flag).

A frozen teacher runs beside the student on the last pipeline stage (the run has PP 1), on the
student's own inputs: tokens, position ids and attention mask, so both see the same context. Its
logits ``[s, b, v/tp]`` are taken from its output layer as they are (no transposed copy, no fp32
copy from a Float16Module). The student's loss hook is wrapped: the KL divergence of the
student's logits from the teacher's (``ops.kl_divergence``, which keeps its own gradient) runs
first, then the loss that was installed (the fused op writes its gradient into the logits in
place, so it must come last).

The losses combine as ModelOpt's loss balancer does for Megatron-LM, on the tokens the LM loss
trains (the loss mask; with ``--slm-ratio``, the selected tokens), per micro-batch, on the
device:

- ``skip_lm_loss`` (the default): the KD loss alone, ``sum(KL)``;
- else ``sum(CE) + kd_loss_scale * sum(KL) * (sum(CE) / sum(KL))``, the ratio a constant (no
  gradient): the KD term is scaled to the LM loss's size, then by ``kd_loss_scale`` (ModelOpt's
  rule; a zero sum leaves the KD term unscaled).

Validation runs no teacher: its loss is the LM loss, comparable with any run's.
"""

from __future__ import annotations

import torch

from megatron_slm.models.sharding import unwrap
from megatron_slm.ops.kl_divergence import vocab_parallel_kl_divergence
from megatron_slm.runtime.loader import load_model
from megatron_slm.runtime.plan import LoadPlan
from megatron_slm.training.config import DistillationSettings


class Teacher:
    """The teacher of ``--export-kd-teacher-load``, loaded by the shared runtime at the
    trainer's TP size (architecture and padded vocabulary its own checkpoint's)."""

    def __init__(self, plan: LoadPlan, device, params_dtype, documents: str | None):
        # ``documents``: the flag whose rows pack several documents (the teacher then gets the
        # spec that honours the student's block-diagonal mask), or None.
        self.model = load_model(plan, device, params_dtype=params_dtype, documents=documents)
        (chunk,) = self.model.chunks
        self.module = unwrap(chunk)  # (Float16Module would copy the logits into fp32)

    @torch.no_grad()
    def logits(self, tokens, position_ids, attention_mask) -> torch.Tensor:
        """``[b, s]`` inputs -> the teacher's ``[s, b, v/tp]`` logits, as its output layer
        wrote them."""
        model = self.module
        own = vars(model).get("compute_language_model_loss")
        model.compute_language_model_loss = lambda labels, logits: logits
        try:  # (labels make GPTModel hand its logits to the loss hook untransposed)
            return model(tokens, position_ids, attention_mask, labels=tokens)
        finally:
            if own is None:
                del model.compute_language_model_loss
            else:
                model.compute_language_model_loss = own


class DistillationLoss:
    """The student's side: the teacher's logits of the coming micro-batch (:meth:`prepare`),
    the KL divergence of each token computed in the student's loss hook (:meth:`take`)."""

    def __init__(self, settings: DistillationSettings, tp_group):
        self.settings, self.tp_group = settings, tp_group
        self._teacher_logits: torch.Tensor | None = None
        self._divergence: torch.Tensor | None = None

    def install(self, model) -> None:
        """Wrap ``model``'s loss hook (the last stage's GPTModel, its loss already installed)."""
        inner = model.compute_language_model_loss

        def compute_language_model_loss(labels, logits):
            teacher, self._teacher_logits = self._teacher_logits, None
            if teacher is not None:  # a training micro-batch
                kl = vocab_parallel_kl_divergence(
                    logits, teacher, self.settings.logit_kl_temperature, self.tp_group
                )
                self._divergence = kl.t()  # [s, b] -> [b, s]
            return inner(labels, logits)

        model.compute_language_model_loss = compute_language_model_loss

    def prepare(self, teacher_logits: torch.Tensor) -> None:
        self._teacher_logits = teacher_logits

    def take(self) -> torch.Tensor | None:
        """The last forward's ``[b, s]`` KL divergence (None: that forward had no teacher)."""
        divergence, self._divergence = self._divergence, None
        return divergence

    def combine(self, lm_sum: torch.Tensor, divergence: torch.Tensor, weights: torch.Tensor):
        """``(loss to optimise, KD sum)`` of a micro-batch: ``lm_sum`` the LM loss summed over
        the trained tokens, ``weights [b, s]`` those tokens (1) and the rest (0)."""
        kd_sum = (divergence * weights).sum()
        s = self.settings
        if s.skip_lm_loss:
            return kd_sum, kd_sum.detach()
        lm, kd = lm_sum.detach(), kd_sum.detach()
        size = torch.where((kd > 0) & (lm > 0), lm / kd, torch.ones_like(kd))
        return lm_sum + s.kd_loss_scale * size * kd_sum, kd
