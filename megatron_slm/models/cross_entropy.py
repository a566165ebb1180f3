"""megatron-core's vocab-parallel cross entropy without its host synchronisations.

``tensor_parallel.vocab_parallel_cross_entropy`` zeroes the targets outside this rank's vocabulary
shard with boolean-mask assignments (``masked_target[target_mask] = 0``), which on CUDA run
``nonzero`` and make the host wait for the device, twice per micro-batch. This is the same
computation, with megatron-core's own helpers in the same order (values and gradients are
bit-identical), and ``masked_fill`` in place of the two assignments.

:func:`install_language_model_loss` makes a ``GPTModel`` chunk compute its plain loss with it.
The trainer replaces it with the fused op (``training/slm_loss.py``: the selective loss, and
plain training's unless ``--cross-entropy-impl megatron`` or ``_C`` has no kernels for the
device); the runtime takes its losses with the fused op too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility

_ops = VocabParallelCrossEntropy


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, tp_group):
        # [s, b, v/tp] -> fp32 (in place when already fp32, like megatron-core)
        logits, logits_max = _ops.calculate_logits_max(vocab_parallel_logits)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
        part = logits.size(-1)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            part, dist.get_rank(tp_group), dist.get_world_size(tp_group)
        )
        logits -= logits_max.unsqueeze(dim=-1)
        target_mask = (target < start) | (target >= end)  # [s, b] True: another rank's shard
        masked_target_1d = (target - start).masked_fill_(target_mask, 0).view(-1)
        logits_2d = logits.view(-1, part)
        rows = torch.arange(logits_2d.size(0), device=logits_2d.device)
        predicted = logits_2d[rows, masked_target_1d].view_as(target).masked_fill_(target_mask, 0)
        exp_logits = torch.exp(logits, out=logits)
        sum_exp_logits = exp_logits.sum(dim=-1)
        dist.all_reduce(predicted, group=tp_group)
        dist.all_reduce(sum_exp_logits, group=tp_group)
        softmax, loss = _ops.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp_logits)
        ctx.tp_group = tp_group
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return loss  # [s, b]

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, rows, update, grad_input = _ops.prepare_gradient_calculation_operands(
            softmax, target_mask
        )
        grad = _ops.calculate_gradients(
            grad_2d, rows, masked_target_1d, update, grad_input, grad_output
        )
        return grad, None, None


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor, target: torch.Tensor, tp_group=None
) -> torch.Tensor:
    """logits ``[s, b, v/tp]`` (this rank's shard), target ``[s, b]`` global ids -> loss ``[s, b]``
    (fp32); same values and gradients as megatron-core's function. The logits are overwritten
    (megatron-core does that too)."""
    group = tp_group or parallel_state.get_tensor_model_parallel_group()
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, group)


def install_language_model_loss(model) -> None:
    """Route ``model.compute_language_model_loss`` (a ``GPTModel`` of the last pipeline stage)
    through :func:`vocab_parallel_cross_entropy`."""
    tp_group = model.pg_collection.tp if hasattr(model, "pg_collection") else None

    def compute_language_model_loss(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        loss = vocab_parallel_cross_entropy(logits, labels.t().contiguous(), tp_group)
        return loss.t().contiguous()  # [s, b] -> [b, s]

    model.compute_language_model_loss = compute_language_model_loss
