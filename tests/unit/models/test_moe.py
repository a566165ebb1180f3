"""--num-experts: megatron-core's MoE layer as the model builds it (torch spec, SequentialMLP
experts) against a pure-PyTorch mixture on the same weights: a linear router, the top-k experts
of each token weighted by the softmax over their logits (Mixtral's) or by the softmax over all
experts (--moe-router-pre-softmax), each expert a SwiGLU MLP. And the parameter count the log
and MFU use is the model's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.dist_helpers import run_distributed


def _reference_mixture(x, router, fc1s, fc2s, topk, pre_softmax):
    """x [t, h]; router [e, h]; fc1s [e] of [2f, h] ([gate; up]); fc2s [e] of [h, f]."""
    logits = x @ router.t()
    if pre_softmax:
        weights, chosen = F.softmax(logits, dim=-1).topk(topk, dim=-1)
    else:
        top, chosen = logits.topk(topk, dim=-1)
        weights = F.softmax(top, dim=-1)
    out = torch.zeros_like(x)
    for e, (fc1, fc2) in enumerate(zip(fc1s, fc2s)):
        gate, up = (x @ fc1.t()).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ fc2.t()
        weight = (weights * (chosen == e)).sum(-1, keepdim=True)  # 0 where not routed to e
        out += weight * y
    return out


def _moe_layer(rank, world, pre_softmax):
    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset

    dev = launch.initialize(device="cpu", seed=3)
    arch = get_preset("tiny").replace(
        num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48,
        moe_router_pre_softmax=pre_softmax,
    )  # fmt: skip
    (model,) = build_model(arch, ModelBuildOptions(transformer_impl="torch"), dev)
    model.eval()
    moe = model.decoder.layers[0].mlp
    x = torch.randn(8, 3, arch.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, _bias = moe(x)
    experts = moe.experts.local_experts
    weights = (
        moe.router.weight.detach(),
        [e.linear_fc1.weight.detach() for e in experts],
        [e.linear_fc2.weight.detach() for e in experts],
    )
    n_params = sum(p.numel() for p in model.parameters())
    # Decoding through megatron-core's KV cache routes each new token as a full forward does.
    from megatron_slm.runtime import LoadedModel, greedy_generate

    lm = LoadedModel([model], arch, None, model.vocab_size, dev, torch.float32, "in memory")
    prompts = [[5, 9, 11, 2, 7], [3, 4]]
    decoded = [greedy_generate(lm, prompts, max_new_tokens=6, use_cache=c) for c in (True, False)]
    return out, x, weights, n_params, arch.num_parameters(model.vocab_size), len(experts), decoded


@pytest.mark.parametrize("pre_softmax", [False, True], ids=["mixtral", "pre-softmax"])
def test_moe_layer_is_a_top_k_mixture_of_swiglu_experts(pre_softmax):
    ((out, x, (router, fc1s, fc2s), n_params, counted, n_experts, decoded),) = run_distributed(
        _moe_layer, 1, pre_softmax
    )
    cached, full = decoded
    assert cached == full and all(len(row) == 6 for row in cached)
    assert n_experts == 4 and fc1s[0].shape == (2 * 48, 64)
    flat = x.reshape(-1, x.shape[-1])
    expected = _reference_mixture(flat, router, fc1s, fc2s, 2, pre_softmax).reshape(x.shape)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert n_params == counted


def test_expert_width_must_split_over_tp():
    from megatron_slm.errors import ConfigError
    from megatron_slm.models import get_preset
    from megatron_slm.models.presets import check_parallel_layout

    arch = get_preset("tiny").replace(num_experts=4, moe_ffn_hidden_size=47)
    check_parallel_layout(arch, 1, 1)
    with pytest.raises(ConfigError, match="does not divide --moe-ffn-hidden-size 47"):
        check_parallel_layout(arch, 2, 1)
