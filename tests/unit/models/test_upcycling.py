"""--moe-use-upcycling: the mixture a dense model upcycles into is megatron-core's own converter's
(``upcycling_utils.upcycle_state_dict``, on the same initial routers), tensor for tensor, at
granularity 1 and 2, with and without --moe-router-pre-softmax, also from a dense model whose
pre-MLP norm sits in linear_fc1 as Transformer Engine's does; at granularity 1 it computes the
dense model's logits; and the architecture it is given by the flags and the dense checkpoint."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.dist_helpers import run_distributed

SEED = 11


def _upcycled_and_megatron_core(rank, world, granularity, pre_softmax):
    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset
    from megatron_slm.models.args import ModelArgs
    from megatron_slm.models.upcycling import (
        initial_router,
        upcycle_chunks,
        upcycled_architecture,
    )

    dev = launch.initialize(device="cpu", seed=3)
    dense_arch = get_preset("tiny")
    flags = ModelArgs(num_experts=4, moe_router_topk=2, moe_router_pre_softmax=pre_softmax)
    moe_arch = upcycled_architecture(dense_arch, flags, granularity, "the dense model")
    opts = ModelBuildOptions(transformer_impl="torch")
    (dense,), (ours,), (theirs,) = (
        build_model(a, opts, dev) for a in (dense_arch,) + (moe_arch,) * 2
    )
    upcycle_chunks([dense], [ours], moe_arch, granularity, SEED)
    with torch.no_grad():  # megatron-core's converter transforms the routers it finds
        for n, layer in enumerate(theirs.decoder.layers):
            layer.mlp.router.weight.copy_(initial_router(SEED, n, moe_arch))
    expected = upcycle_state_dict([theirs], [dense])["model"]
    tokens = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16)[None].expand(2, -1)
    dense.eval(), ours.eval()
    with torch.no_grad():
        logits = [m(tokens, positions, None) for m in (dense, ours)]
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    expected = {k: v for k, v in expected.items() if not k.endswith("_extra_state")}
    # Transformer Engine's dense layer holds its pre-MLP norm in linear_fc1 (a mixture layer has
    # its own): the same dense weights under that name upcycle alike.
    for layer in dense.decoder.layers:
        layer.mlp.linear_fc1.register_parameter("layer_norm_weight", layer.pre_mlp_layernorm.weight)
        layer.pre_mlp_layernorm.register_parameter("weight", None)
    assert any(n.endswith("linear_fc1.layer_norm_weight") for n, _ in dense.named_parameters())
    (fused,) = build_model(moe_arch, opts, dev)
    upcycle_chunks([dense], [fused], moe_arch, granularity, SEED)
    fused = {k: v for k, v in fused.state_dict().items() if not k.endswith("_extra_state")}
    return state, expected, logits, moe_arch, fused


@pytest.mark.parametrize(
    "granularity, pre_softmax",
    [(1, False), (2, False), (2, True)],
    ids=["g1", "g2", "g2-pre-softmax"],
)
def test_upcycled_mixture_is_megatron_cores(granularity, pre_softmax):
    ((state, expected, (dense_logits, moe_logits), arch, fused),) = run_distributed(
        _upcycled_and_megatron_core, 1, granularity, pre_softmax
    )
    assert arch.num_experts == 4 and arch.moe_ffn_hidden_size in (None, 176 // granularity)
    assert state.keys() == expected.keys()
    for name, value in state.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(fused[name], value, rtol=0, atol=0, msg=name)
    fc1 = state["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"]
    assert fc1.shape == (2 * 176 // granularity, 64)
    if granularity == 1 and not pre_softmax:  # every expert the dense MLP, weights summing to 1
        torch.testing.assert_close(moe_logits, dense_logits, rtol=1e-5, atol=1e-5)
    else:  # (the activation scale only approximates the dense MLP)
        assert not torch.allclose(moe_logits, dense_logits, rtol=1e-3, atol=1e-3)


def test_upcycled_architecture_from_flags_and_checkpoint():
    """The dense checkpoint's architecture with the mixture's flags; the others confirm it
    (--ffn-hidden-size as the dense width or, Megatron-LM's reading, the experts'); one line
    for each mistake."""
    from megatron_slm.checkpoint import CheckpointInfo, resolve_upcycled_architecture
    from megatron_slm.errors import CheckpointError, ConfigError
    from megatron_slm.models import get_preset
    from megatron_slm.models.args import ModelArgs

    dense = get_preset("tiny")
    info = CheckpointInfo(
        path="dense", meta=json.loads(json.dumps({"model": dataclasses.asdict(dense)}))
    )
    moe = resolve_upcycled_architecture(
        ModelArgs(num_experts=8, ffn_hidden_size=88, moe_layer_freq="[0,1,1,1]"), info, 512, 2
    )
    assert moe == dense.replace(num_experts=8, moe_ffn_hidden_size=88, moe_layer_freq=(0, 1, 1, 1))
    assert resolve_upcycled_architecture(
        ModelArgs(num_experts=4, ffn_hidden_size=176), info, None, 1
    ) == (dense.replace(num_experts=4))
    mixture = moe.replace(moe_layer_freq=None)
    moe_info = CheckpointInfo(
        path="moe", meta=json.loads(json.dumps({"model": dataclasses.asdict(mixture)}))
    )
    A = ModelArgs  # noqa: N806
    for args, granularity, info_, error, message in [
        (A(), 1, info, ConfigError, "--moe-use-upcycling needs --num-experts"),
        (A(num_experts=4), 1, moe_info, ConfigError, "is a mixture of experts already"),
        (A(num_experts=6), 4, info, ConfigError, "--num-experts 6 must be a multiple of"),
        (A(num_experts=6), 3, info, ConfigError, "granularity 3 does not divide the dense"),
        (A(num_experts=4, moe_ffn_hidden_size=40), 2, info, ConfigError, "experts of width 88"),
        (A(num_experts=4, moe_shared_expert_intermediate_size=8), 1, info, ConfigError,
         "a shared expert would start untrained"),
        (A(num_experts=4, hidden_size=32), 1, info, CheckpointError, "--hidden-size 32 contra"),
        (A(num_experts=4, ffn_hidden_size=100), 2, info, CheckpointError, "--ffn-hidden-size 100"),
    ]:  # fmt: skip
        with pytest.raises(error, match=message):
            resolve_upcycled_architecture(args, info_, 512, granularity)
