"""runtime/hf_moe.py: GLM-4.5's config read as its mixture and refused where megatron-core's
router would differ; an export that GLM-4.5 cannot hold refused in one line; a directory's
tensors under Qwen-MoE's names (GLM-4.5's multi-token-prediction layers hidden, Mixtral's missing
tensors named as Mixtral names them). The numbers themselves: ``test_hf_interop.py``."""

from __future__ import annotations

import pytest
import torch

from megatron_slm.convert.hf_target import hf_config_from_gpt
from megatron_slm.runtime.hf_moe import GLM4_MOE, MIXTRAL, moe_weights
from megatron_slm.runtime.hf_source import ConversionError, gpt_config_from_hf

GLM = dict(architectures=[GLM4_MOE], hidden_size=64, intermediate_size=128, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
           max_position_embeddings=128, rms_norm_eps=1e-5, partial_rotary_factor=0.5,
           attention_bias=True, use_qk_norm=False, n_routed_experts=8, num_experts_per_tok=4,
           moe_intermediate_size=32, n_shared_experts=2, n_group=4, topk_group=2,
           first_k_dense_replace=2, routed_scaling_factor=1.5, norm_topk_prob=True)  # fmt: skip


def test_glm_config_is_deepseek_v3s_router():
    model = gpt_config_from_hf(GLM)
    assert model.moe_layers == (False, False, True, True)
    assert (model.num_experts, model.moe_router_topk, model.expert_ffn_hidden_size) == (8, 4, 32)
    assert model.moe_router_score_function == "sigmoid" and model.moe_router_enable_expert_bias
    assert (model.moe_router_num_groups, model.moe_router_group_topk) == (4, 2)
    assert model.moe_router_topk_scaling_factor == 1.5
    assert model.moe_shared_expert_intermediate_size == 64 and not model.moe_shared_expert_gate
    assert model.add_qkv_bias and not model.qk_layernorm and model.rotary_percent == 0.5
    back = hf_config_from_gpt(model, GLM4_MOE)
    for key in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                "n_shared_experts", "n_group", "topk_group", "first_k_dense_replace",
                "routed_scaling_factor", "attention_bias", "use_qk_norm",
                "partial_rotary_factor"):  # fmt: skip
        assert back[key] == GLM[key], key
    ungrouped = gpt_config_from_hf({**GLM, "n_group": 1, "topk_group": 1})
    assert ungrouped.moe_router_num_groups is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"norm_topk_prob": False}, "norm_topk_prob=false is not supported"),
        ({"topk_group": 1}, "n_group 4 with num_experts_per_tok 4 and topk_group 1"),
    ],
)
def test_glm_routers_megatron_core_would_differ_on_are_refused(change, message):
    with pytest.raises(ConversionError, match=message):
        gpt_config_from_hf({**GLM, **change})


def test_glm_export_needs_its_shape_of_mixture():
    model = gpt_config_from_hf(GLM)
    with pytest.raises(ConversionError, match="a shared expert of n x --moe-ffn-hidden-size 32"):
        hf_config_from_gpt(model.replace(moe_shared_expert_intermediate_size=48), GLM4_MOE)
    with pytest.raises(ConversionError, match="dense layers first only"):
        hf_config_from_gpt(model.replace(moe_layer_freq=(1, 0, 1, 1)), GLM4_MOE)
    with pytest.raises(ConversionError, match="needs .*an expert bias"):
        hf_config_from_gpt(model.replace(moe_router_enable_expert_bias=False), GLM4_MOE)


class _Files:
    """A directory's tensors (names -> shapes) as ``HFWeights`` shows them."""

    path = "dir"

    def __init__(self, names):
        self._shapes = {n: (1,) for n in names}

    def names(self):
        return list(self._shapes)

    def __contains__(self, name):
        return name in self._shapes

    def shape(self, name):
        return self._shapes[name]

    def get(self, name):
        return torch.zeros(self._shapes[name])

    def location(self, name):
        return f"dir/{name}"


def test_directories_show_qwen_moe_names():
    glm = moe_weights(_Files(["model.layers.1.mlp.shared_experts.up_proj.weight",
                              "model.layers.1.mlp.gate.e_score_correction_bias",
                              "model.layers.2.eh_proj.weight"]), GLM4_MOE, 2)  # fmt: skip
    assert sorted(glm.names()) == ["model.layers.1.mlp.gate.e_score_correction_bias",
                                   "model.layers.1.mlp.shared_expert.up_proj.weight"]  # fmt: skip
    assert glm.location("model.layers.1.mlp.shared_expert.up_proj.weight") == (
        "dir/model.layers.1.mlp.shared_experts.up_proj.weight"
    )
    mixtral = moe_weights(_Files(["model.layers.0.block_sparse_moe.experts.3.w3.weight"]),
                          MIXTRAL, 1)  # fmt: skip
    assert mixtral.names() == ["model.layers.0.mlp.experts.3.up_proj.weight"]
    assert mixtral.source_name("model.layers.0.mlp.experts.5.gate_proj.weight") == (
        "model.layers.0.block_sparse_moe.experts.5.w1.weight"
    )
