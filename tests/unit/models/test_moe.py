"""--num-experts: megatron-core's MoE layer as the model builds it (torch spec, SequentialMLP
experts) against a pure-PyTorch mixture on the same weights: a linear router, the top-k experts
of each token weighted by the softmax over their logits (Mixtral's) or by the softmax over all
experts (--moe-router-pre-softmax) or, DeepSeek-V3's, by their sigmoid scores (chosen with an
expert bias, from the best groups, scaled), each expert a SwiGLU MLP; with a shared expert (gated
by sigmoid(w . x) or not) added, dense layers where --moe-layer-freq says, and the tokens beyond
an expert's capacity dropped. And the parameter count and FLOPs the log and MFU use."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from tests.dist_helpers import run_distributed


def _swiglu(x, fc1, fc2):
    gate, up = (x @ fc1.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2.t()


def _reference_routing(logits, topk, options, bias=None):
    """(weights, chosen) [t, k] of each token, by the router ``options`` (the model's fields)."""
    if options.get("moe_router_score_function") == "sigmoid":
        scores = torch.sigmoid(logits)
        choosing = scores if bias is None else scores + bias  # (the bias chooses, not weighs)
        groups, group_topk = (
            options.get("moe_router_num_groups"),
            options.get("moe_router_group_topk"),
        )
        if groups:  # keep the experts of the groups whose best topk/group_topk sum highest
            per_group = choosing.view(len(logits), groups, -1)
            best = per_group.topk(topk // group_topk, dim=-1).values.sum(-1)
            kept = torch.zeros_like(best).scatter(1, best.topk(group_topk, dim=-1).indices, 1)
            kept = kept.repeat_interleave(per_group.shape[-1], dim=1).bool()
            choosing = choosing.masked_fill(~kept, float("-inf"))
        chosen = choosing.topk(topk, dim=-1).indices
        weights = scores.gather(1, chosen)
        weights = weights / weights.sum(-1, keepdim=True)
    elif options.get("moe_router_pre_softmax"):
        weights, chosen = F.softmax(logits, dim=-1).topk(topk, dim=-1)
    else:
        top, chosen = logits.topk(topk, dim=-1)
        weights = F.softmax(top, dim=-1)
    return weights * options.get("moe_router_topk_scaling_factor", 1.0), chosen


def _reference_mixture(x, router, fc1s, fc2s, routing, shared=None):
    """x [t, h]; router [e, h]; fc1s [e] of [2f, h] ([gate; up]); fc2s [e] of [h, f];
    ``routing(logits)``: (weights, chosen); ``shared``: (fc1, fc2, gate [1, h] or None) of a
    shared expert."""
    weights, chosen = routing(x @ router.t())
    out = torch.zeros_like(x)
    for e, (fc1, fc2) in enumerate(zip(fc1s, fc2s)):
        weight = (weights * (chosen == e)).sum(-1, keepdim=True)  # 0 where not routed to e
        out += weight * _swiglu(x, fc1, fc2)
    if shared is not None:
        fc1, fc2, gate = shared
        y = _swiglu(x, fc1, fc2)
        out += y if gate is None else torch.sigmoid(x @ gate.t()) * y
    return out


VARIANTS = {
    "mixtral": {},
    "pre-softmax": dict(moe_router_pre_softmax=True),
    # Qwen2-MoE's: softmax over all experts, a gated shared expert, dense layers 0 and 3
    "shared-gated": dict(moe_router_pre_softmax=True, moe_shared_expert_intermediate_size=40,
                         moe_shared_expert_gate=True, moe_layer_freq=(0, 1, 1, 0)),
    "shared": dict(moe_shared_expert_intermediate_size=40, moe_layer_freq=2),  # layers 0, 2
    # DeepSeek-V3's: sigmoid scores, a bias choosing the experts, 1 of 4 groups (the group
    # whose two experts sum highest), scaled weights
    "sigmoid-bias-groups": dict(moe_router_score_function="sigmoid", moe_router_num_groups=4,
                                moe_router_group_topk=1, moe_router_topk_scaling_factor=2.5,
                                moe_router_enable_expert_bias=True),
}  # fmt: skip


def _moe_layer(rank, world, variant):
    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset

    dev = launch.initialize(device="cpu", seed=3)
    arch = get_preset("tiny").replace(
        num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=48, **VARIANTS[variant]
    )
    (model,) = build_model(arch, ModelBuildOptions(transformer_impl="torch"), dev)
    model.eval()
    routed = [hasattr(layer.mlp, "router") for layer in model.decoder.layers]
    moe = model.decoder.layers[routed.index(True)].mlp
    x = torch.randn(8, 3, arch.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if arch.moe_shared_expert_gate:  # (initialised by the std 0.02: every sigmoid ~0.5)
            moe.shared_experts.gate_weight.normal_(0, 0.5)
        if arch.moe_router_enable_expert_bias:  # (initialised to 0: large enough to reroute)
            moe.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, arch.num_experts))
            moe.router.weight.normal_(0, 0.3)
        out, _bias = moe(x)
    experts = moe.experts.local_experts
    weights = (
        moe.router.weight.detach(),
        [e.linear_fc1.weight.detach() for e in experts],
        [e.linear_fc2.weight.detach() for e in experts],
    )
    shared = moe.shared_experts and (
        moe.shared_experts.linear_fc1.weight.detach(),
        moe.shared_experts.linear_fc2.weight.detach(),
        moe.shared_experts.gate_weight,
    )
    bias = moe.router.expert_bias
    n_params = sum(p.numel() for p in model.parameters())
    # Decoding through megatron-core's KV cache routes each new token as a full forward does.
    from megatron_slm.runtime import LoadedModel, greedy_generate

    lm = LoadedModel([model], arch, None, model.vocab_size, dev, torch.float32, "in memory")
    prompts = [[5, 9, 11, 2, 7], [3, 4]]
    decoded = [greedy_generate(lm, prompts, max_new_tokens=6, use_cache=c) for c in (True, False)]
    counted = arch.num_parameters(model.vocab_size)
    return out, x, weights, shared, bias, routed, n_params, counted, len(experts), decoded


@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_layer_is_a_top_k_mixture_of_swiglu_experts(variant):
    (
        (out, x, (router, fc1s, fc2s), shared, bias, routed, n_params, counted, n_experts, decoded),
    ) = run_distributed(_moe_layer, 1, variant)
    options = VARIANTS[variant]
    cached, full = decoded
    assert cached == full and all(len(row) == 6 for row in cached)
    assert n_experts == 8 and fc1s[0].shape == (2 * 48, 64)
    assert routed == {(0, 1, 1, 0): [False, True, True, False], 2: [True, False, True, False]}.get(
        options.get("moe_layer_freq"), [True] * 4
    )
    assert bool(shared) == ("moe_shared_expert_intermediate_size" in options)
    if shared:
        assert shared[0].shape == (2 * 40, 64)
        assert (shared[2] is not None) == options.get("moe_shared_expert_gate", False)
    flat = x.reshape(-1, x.shape[-1])
    assert (bias is not None) == options.get("moe_router_enable_expert_bias", False)
    routing = lambda logits: _reference_routing(logits, 2, options, bias)  # noqa: E731
    expected = _reference_mixture(flat, router, fc1s, fc2s, routing, shared or None)
    torch.testing.assert_close(out, expected.reshape(x.shape), rtol=1e-5, atol=1e-5)
    if bias is not None:  # the bias and the groups changed some choices (else unseen here)
        logits, chosen = flat @ router.t(), routing(flat @ router.t())[1].sort().values
        ungrouped = {k: v for k, v in options.items() if "group" not in k}
        for other in (_reference_routing(logits, 2, options), _reference_routing(
            logits, 2, ungrouped, bias
        )):  # fmt: skip
            assert (other[1].sort().values != chosen).any()
    assert n_params == counted


def test_expert_width_must_split_over_tp():
    from megatron_slm.errors import ConfigError
    from megatron_slm.models import get_preset
    from megatron_slm.models.presets import check_parallel_layout

    arch = get_preset("tiny").replace(num_experts=4, moe_ffn_hidden_size=47)
    check_parallel_layout(arch, 1, 1)
    with pytest.raises(ConfigError, match="does not divide --moe-ffn-hidden-size 47"):
        check_parallel_layout(arch, 2, 1)
    arch = get_preset("tiny").replace(num_experts=4, moe_shared_expert_intermediate_size=33)
    with pytest.raises(ConfigError, match="does not divide --moe-shared-expert-intermediate-size"):
        check_parallel_layout(arch, 2, 1)


def test_moe_layer_freq_reads_as_megatron_lm_and_resolves_against_a_checkpoint():
    """N: a mixture in layers 0, N, 2N, ... (megatron-core's reading); a pattern as given; every
    layer: recorded as None. A flag confirming a checkpoint's pattern in the other form agrees."""
    from megatron_slm.checkpoint import CheckpointInfo, resolve_architecture
    from megatron_slm.errors import CheckpointError
    from megatron_slm.models import get_preset
    from megatron_slm.models.args import ModelArgs

    tiny = get_preset("tiny").replace(num_experts=4)
    assert tiny.replace(moe_layer_freq=2).moe_layers == (True, False, True, False)
    assert tiny.replace(moe_layer_freq=3).moe_layer_freq == (1, 0, 0, 1)
    assert tiny.replace(moe_layer_freq=[1, 1, 1, 1]).moe_layer_freq is None
    assert tiny.replace(moe_layer_freq=1).moe_layers == (True,) * 4
    assert get_preset("tiny").moe_layers == (False,) * 4
    saved = tiny.replace(moe_layer_freq=(1, 0, 1, 0))
    record = json.loads(json.dumps({"model": dataclasses.asdict(saved)}))  # (the pattern a list)
    info = CheckpointInfo(path="ckpt", meta=record)
    assert info.model == saved
    for freq in ("2", "[1,0]*2"):
        args = ModelArgs(num_experts=4, moe_layer_freq=freq)
        assert resolve_architecture(args, info, None) == saved
    with pytest.raises(CheckpointError, match="--moe-layer-freq \\[1,1,1,0\\] contradicts"):
        resolve_architecture(ModelArgs(num_experts=4, moe_layer_freq="[1]*3+[0]"), info, None)


def test_flops_count_each_layers_mlp():
    """Training FLOPs per token: a dense layer's MLP where --moe-layer-freq puts one, the top-k
    experts, the router and the shared expert (with its gate) where a mixture is."""
    from megatron_slm.models import get_preset

    tiny = get_preset("tiny")
    h, f, seq = tiny.hidden_size, tiny.ffn_hidden_size, 32
    shared = dict(moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=True)
    moe = tiny.replace(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48, **shared)
    per_mixture = 3 * h * (2 * 48 + 40) + h * 4 + h  # experts, shared expert; router, gate
    per_dense = 3 * h * f
    # forward + backward = 3 x (2 FLOPs per multiply-add)
    assert moe.flops_per_token(seq) - tiny.flops_per_token(seq) == 6 * 4 * (per_mixture - per_dense)
    mixed = moe.replace(moe_layer_freq=(0, 1, 1, 0))
    assert mixed.flops_per_token(seq) - tiny.flops_per_token(seq) == 6 * 2 * (
        per_mixture - per_dense
    )


def _capacity_layer(rank, world, policy):
    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset

    dev = launch.initialize(device="cpu", seed=4)
    arch = get_preset("tiny").replace(num_experts=4, moe_router_topk=2)
    capacity = {"moe_expert_capacity_factor": 0.5, "moe_token_drop_policy": policy}
    (model,) = build_model(arch, ModelBuildOptions(transformer_impl="torch", moe=capacity), dev)
    moe = model.decoder.layers[0].mlp
    x = torch.randn(8, 3, arch.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, _bias = moe(x)
        routing_map = moe.router(x.reshape(-1, arch.hidden_size))[1]
    experts = moe.experts.local_experts
    weights = (
        moe.router.weight.detach(),
        [e.linear_fc1.weight.detach() for e in experts],
        [e.linear_fc2.weight.detach() for e in experts],
    )
    return out, x, weights, routing_map


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_expert_capacity_drops_the_tokens_beyond_it(policy):
    """--moe-expert-capacity-factor 0.5 (a training flag): each of 4 experts takes at most
    ceil(24 tokens x top-2 / 4 x 0.5) = 6 of a micro-batch's routed tokens; by probs the 6 it
    weighs most (the mixture of the reference with the rest dropped), by position some 6."""
    ((out, x, (router, fc1s, fc2s), kept),) = run_distributed(_capacity_layer, 1, policy)
    flat = x.reshape(-1, x.shape[-1])
    weights, chosen = _reference_routing(flat @ router.t(), 2, {})
    dense = torch.zeros(len(flat), 4).scatter(1, chosen, weights)
    assert (kept.sum(0) <= 6).all() and (kept & (dense == 0)).sum() == 0
    assert ((dense > 0).sum(0) > 6).any()  # (some expert had more: tokens were dropped)
    if policy == "probs":
        expected_kept = torch.zeros_like(kept)
        for e in range(4):
            expected_kept[dense[:, e].topk(6).indices[dense[:, e].topk(6).values > 0], e] = True
        assert torch.equal(kept, expected_kept)
    survivors = dense * kept  # (a dropped token's other expert keeps its weight)

    def routing(_logits):
        return survivors, torch.arange(4).expand(len(flat), 4)

    expected = _reference_mixture(flat, router, fc1s, fc2s, routing)
    torch.testing.assert_close(out, expected.reshape(x.shape), rtol=1e-5, atol=1e-5)
