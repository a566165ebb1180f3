"""Plain training's loss (``training/slm_loss.py::install_plain_loss``) against megatron-core's.

With ``--cross-entropy-impl fused`` (the default) a last-stage GPTModel computes its per-token
loss with the fused op; its losses and parameter gradients must match megatron-core's own
``compute_language_model_loss`` (its ``vocab_parallel_cross_entropy``) run in float64, within
twice the error of megatron-core's float32 computation plus one float32 ulp of the largest value
(float32 results are whole ulps apart: 2 ulps against megatron-core's 1 is the same precision).
Where the op has no compiled kernels for the device, and with ``megatron``, the model keeps
megatron-core's loss.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import run_distributed

SEQ, BATCH = 16, 3


def _loss_and_grads(model, tokens, weights):
    """Per-token loss ``[b, s]`` and the parameters' gradients of ``sum(weights * loss)``."""
    model.zero_grad(set_to_none=True)
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:])  # [b, s]
    (loss * weights.to(loss.dtype)).sum().backward()
    return loss.detach().double(), [p.grad.double() for p in model.parameters()]


def _worker(rank, world):
    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset
    from megatron_slm.ops import compiled_kernels_for
    from megatron_slm.training.slm_loss import install_plain_loss

    dev = launch.initialize(device="cpu", seed=5)
    (model,) = build_model(get_preset("tiny"), ModelBuildOptions(transformer_impl="torch"), dev)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 500, (BATCH, SEQ + 1), generator=g)
    weights = torch.rand(BATCH, SEQ, generator=g)

    provider_loss = vars(model)["compute_language_model_loss"]  # megatron-core's computation
    kept = {"megatron": install_plain_loss(model, "megatron", dev)}
    if compiled_kernels_for(torch.device("cuda")) is None:  # a build without CUDA kernels
        kept["cuda"] = install_plain_loss(model, "fused", torch.device("cuda"))
    unchanged = vars(model)["compute_language_model_loss"] is provider_loss
    how = install_plain_loss(model, "fused", dev)
    installed = vars(model)["compute_language_model_loss"] is not provider_loss
    ours = _loss_and_grads(model, tokens, weights)
    del model.compute_language_model_loss  # megatron-core's own method from here on
    megatron = _loss_and_grads(model, tokens, weights)
    model.double()
    exact = _loss_and_grads(model, tokens, weights)
    return kept, unchanged, how, installed, ours, megatron, exact


def _max_err(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _tolerance(megatron, exact) -> float:
    """2x megatron-core's float32 error against float64, plus one float32 ulp of the largest."""
    ulp = torch.finfo(torch.float32).eps * max(x.abs().max().item() for x in exact)
    return 2 * _max_err(megatron, exact) + ulp


def test_fused_plain_loss_matches_megatron_core():
    kept, unchanged, how, installed, ours, megatron, exact = run_distributed(_worker, 1)[0]
    assert kept.pop("megatron").startswith("megatron-core's vocab_parallel_cross_entropy (--cro")
    for why in kept.values():  # a CPU-only build: fused on cuda would be the pure-PyTorch op
        assert why.startswith("megatron-core's") and "has no kernels for cuda" in why
    assert unchanged and installed, (unchanged, installed)
    assert how == "the fused op (megatron_slm._C, cpp kernels)"
    (loss, grads), (m_loss, m_grads), (x_loss, x_grads) = ours, megatron, exact
    assert len(grads) == len(m_grads) == len(x_grads) > 5
    loss_tol, grad_tol = _tolerance([m_loss], [x_loss]), _tolerance(m_grads, x_grads)
    assert loss_tol < 1e-5 and grad_tol < 1e-5  # float32 rounding of values of order 1-10
    assert _max_err([loss], [x_loss]) <= loss_tol
    assert _max_err(grads, x_grads) <= grad_tol
    assert (loss - m_loss).abs().max().item() > 0 or _max_err(grads, m_grads) > 0  # two impls


def test_megatron_impl_with_selection_is_refused():
    from megatron_slm.errors import ConfigError
    from megatron_slm.models import get_preset
    from megatron_slm.training.config import parse_config, validate

    argv = ["--data-path", "corpus", "--train-iters", "1", "--cross-entropy-impl", "megatron"]
    validate(parse_config(argv), 1, get_preset("tiny"))  # plain training: fine
    with pytest.raises(ConfigError, match="--cross-entropy-impl megatron cannot select tokens"):
        validate(parse_config([*argv, "--slm-ratio", "0.6"]), 1, get_preset("tiny"))
