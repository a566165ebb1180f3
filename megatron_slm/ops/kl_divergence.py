"""Per-token KL divergence of a student's vocabulary-parallel logits from a teacher's (knowledge
distillation's logit loss, ModelOpt's ``LogitsKLLoss`` as Megatron-LM uses it).

``KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v))`` of each token, with both
softmaxes taken over the whole (padded) vocabulary at temperature ``T`` (logits divided by it),
each TP rank holding its ``[..., v/tp]`` columns of both. The student's gradient,
``(p_s - p_t) / T`` times the token's upstream gradient, is computed in the forward and kept (the
fused selective loss, which runs next on the same logits, writes its own gradient into them in
place, so nothing may read the logits in backward). Both tensors are read in row chunks, so the
fp32 temporaries stay bounded at any vocabulary; three passes (maxima, sums, divergence) cost
three collectives on the TP group, whatever the number of rows.

Pure PyTorch: a distillation step's cost is the teacher's forward, which this does not change.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# fp32 elements of one row chunk's temporaries (a few such tensors live at once): 64 MiB each.
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(rows: int, width: int):
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, tp_group):
        width = student.shape[-1]
        s_rows, t_rows = student.reshape(-1, width), teacher.reshape(-1, width)
        n = s_rows.shape[0]
        chunks = _row_chunks(n, width)
        dev = student.device
        # a fresh fp32 copy of rows a..b (never the input itself: the passes work in place)
        scaled = lambda x, a, b: x[a:b].to(torch.float32, copy=True).div_(temperature)  # noqa: E731

        maxima = torch.empty(2, n, dtype=torch.float32, device=dev)
        for a, b in chunks:
            maxima[0, a:b] = scaled(s_rows, a, b).amax(dim=-1)
            maxima[1, a:b] = scaled(t_rows, a, b).amax(dim=-1)
        _all_reduce(maxima, dist.ReduceOp.MAX, tp_group)
        sums = torch.empty(2, n, dtype=torch.float32, device=dev)
        for a, b in chunks:
            sums[0, a:b] = scaled(s_rows, a, b).sub_(maxima[0, a:b, None]).exp_().sum(dim=-1)
            sums[1, a:b] = scaled(t_rows, a, b).sub_(maxima[1, a:b, None]).exp_().sum(dim=-1)
        _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
        log_z = maxima + sums.log()  # [2, n]: each row's log-normaliser, student's and teacher's

        wants_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(s_rows) if wants_grad else None
        kl = torch.empty(n, dtype=torch.float32, device=dev)
        for a, b in chunks:
            log_ps = scaled(s_rows, a, b).sub_(log_z[0, a:b, None])
            log_pt = scaled(t_rows, a, b).sub_(log_z[1, a:b, None])
            p_t = log_pt.exp()
            # p_t = 0 contributes nothing (its log may be -inf): 0 * (-inf) would be NaN
            kl[a:b] = torch.where(p_t > 0, p_t * (log_pt - log_ps), 0.0).sum(dim=-1)
            if wants_grad:
                grad[a:b] = log_ps.exp_().sub_(p_t).div_(temperature)
        _all_reduce(kl, dist.ReduceOp.SUM, tp_group)
        if wants_grad:
            ctx.save_for_backward(grad)
        return kl.view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        (grad,) = ctx.saved_tensors
        # The saved gradient is needed once: scaled in place, it is the input's gradient.
        grad.mul_(grad_kl.reshape(-1, 1).to(grad.dtype))
        return grad.view(*grad_kl.shape, -1), None, None, None


def vocab_parallel_kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    tp_group=None,
) -> torch.Tensor:
    """``[..., v/tp]`` logits of both models (this TP rank's columns, the same on every rank of
    ``tp_group``) -> ``[...]`` fp32 KL(teacher || student) of each token over the whole
    vocabulary at ``temperature``, differentiable in ``student_logits`` only."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), temperature, tp_group)
