"""The vocabulary-parallel KL divergence of knowledge distillation against torch's ``kl_div`` over
the whole vocabulary in float64: values and student gradients at temperatures 1 and 2, in row
chunks, in bf16, beside the fused selective loss writing its gradient into the same logits, and
at TP 2 in real gloo processes (each rank's columns; three collectives whatever the rows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_slm.ops import kl_divergence
from megatron_slm.ops.kl_divergence import vocab_parallel_kl_divergence
from tests.dist_helpers import run_distributed

S, B, V = 6, 3, 40


def _logits(seed: int):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(S, B, V, generator=g) * 3
    teacher = torch.randn(S, B, V, generator=g) * 3
    teacher[0, 0, :5] = float("-inf")  # tokens the teacher rules out add nothing
    weights = torch.rand(S, B, generator=g) + 0.5
    return student, teacher, weights


def reference(student, teacher, temperature):
    """KL(teacher || student) per token, float64, and its gradient machinery (autograd)."""
    log_ps = F.log_softmax(student.double() / temperature, dim=-1)
    p_t = F.softmax(teacher.double() / temperature, dim=-1)
    return F.kl_div(log_ps, p_t, reduction="none").sum(dim=-1)  # (0 where p_t is: xlogy)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunked", [False, True])
def test_values_and_gradient_are_torch_kl_div(temperature, chunked, monkeypatch):
    if chunked:  # two rows per chunk: 9 chunks
        monkeypatch.setattr(kl_divergence, "_CHUNK_ELEMENTS", 2 * V)
    student, teacher, weights = _logits(0)
    x = student.clone().requires_grad_()
    kl = vocab_parallel_kl_divergence(x, teacher, temperature)
    (kl * weights).sum().backward()
    y = student.double().requires_grad_()
    ref = reference(y, teacher, temperature)
    (ref * weights.double()).sum().backward()
    assert kl.dtype == torch.float32 and kl.shape == (S, B)
    torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-5, atol=1e-6)
    assert (kl >= -1e-6).all() and kl[0, 0] > 0


def test_bfloat16_logits():
    student, teacher, weights = _logits(1)
    x = student.bfloat16().requires_grad_()
    kl = vocab_parallel_kl_divergence(x, teacher.bfloat16())
    (kl * weights).sum().backward()
    y = student.bfloat16().double().requires_grad_()
    ref = reference(y, teacher.bfloat16(), 1.0)
    (ref * weights.double()).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=2e-2, atol=2e-3)


def test_beside_the_fused_loss_that_writes_into_the_logits():
    """The trainer's order: the divergence first, then the selective loss with its gradient
    written into the logits in place; the logits' gradient is the sum of both terms."""
    from megatron_slm.ops import selective_cross_entropy

    student, teacher, weights = _logits(2)
    target = torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(3))
    leaf = student.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as the output layer's
    kl = vocab_parallel_kl_divergence(logits, teacher)
    ce = selective_cross_entropy(logits, target, mode="loss", inplace_backward=True).loss
    (kl * weights + 0.5 * ce).sum().backward()
    y = student.double().requires_grad_()
    ref_ce = F.cross_entropy(y.flatten(0, 1), target.flatten(), reduction="none").view(S, B)
    (reference(y, teacher, 1.0) * weights.double() + 0.5 * ref_ce).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), y.grad, rtol=1e-5, atol=1e-6)


def test_refuses_mismatched_shapes_and_temperatures():
    student, teacher, _ = _logits(0)
    with pytest.raises(ValueError, match="differ in shape"):
        vocab_parallel_kl_divergence(student, teacher[..., :-1])
    with pytest.raises(ValueError, match="temperature must be positive"):
        vocab_parallel_kl_divergence(student, teacher, 0.0)


def _tp_worker(rank, world, temperature):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    student, teacher, weights = _logits(4)
    cols = slice(rank * V // world, (rank + 1) * V // world)
    x = student[..., cols].clone().requires_grad_()
    group = ps.get_tensor_model_parallel_group()
    # Rows in 9 chunks: still one collective per pass (maxima, sums, divergence), none per chunk.
    kl_divergence._CHUNK_ELEMENTS = 2 * V // world
    calls = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(1) or all_reduce(*a, **k)
    try:
        kl = vocab_parallel_kl_divergence(x, teacher[..., cols].contiguous(), temperature, group)
        (kl * weights).sum().backward()
    finally:
        dist.all_reduce = all_reduce
    ps.destroy_model_parallel()
    return kl, x.grad, len(calls)


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_tensor_parallel_shards_give_the_whole_vocabulary(temperature):
    student, teacher, weights = _logits(4)
    y = student.double().requires_grad_()
    ref = reference(y, teacher, temperature)
    (ref * weights.double()).sum().backward()
    results = run_distributed(_tp_worker, 2, temperature)
    for rank, (kl, grad, collectives) in enumerate(results):
        assert collectives == 3
        torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        cols = slice(rank * V // 2, (rank + 1) * V // 2)
        torch.testing.assert_close(grad.double(), y.grad[..., cols], rtol=1e-5, atol=1e-6)
