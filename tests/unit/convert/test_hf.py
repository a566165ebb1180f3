"""HF <-> megatron mapping and bad-input errors, on hand-made tiny HF directories (no models)."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from megatron_slm.checkpoint import divisible_by_for_padded
from megatron_slm.convert import ConversionError, hf_files, hf_target
from megatron_slm.models.sharding import tp_shard
from megatron_slm.runtime import hf_source

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "vocab_size": 100,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def _write_hf(path, config=HF_CONFIG, tensors=None, shards=1):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if tensors is None:
        model = hf_source.gpt_config_from_hf(config)
        g = torch.Generator().manual_seed(0)
        tensors = {
            n: torch.randn(s, generator=g) for n, s in hf_source.expected_hf_shapes(model).items()
        }
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, os.path.join(path, file))
            weight_map.update(dict.fromkeys(part, file))
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return tensors


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}  # fmt: skip


def test_config_mapping_transformers_4_and_5_styles():
    model = hf_source.gpt_config_from_hf(HF_CONFIG)
    assert (model.num_layers, model.hidden_size, model.ffn_hidden_size) == (2, 32, 48)
    assert (model.num_attention_heads, model.num_query_groups, model.vocab_size) == (4, 2, 100)
    assert model.rotary_base == 500000.0 and model.norm_epsilon == 1e-5
    v5 = {k: v for k, v in HF_CONFIG.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    assert hf_source.gpt_config_from_hf(v5).rotary_base == 1234.0
    back = hf_target.hf_config_from_gpt(model, "MistralForCausalLM")
    assert back["architectures"] == ["MistralForCausalLM"] and back["vocab_size"] == 100
    assert hf_source.gpt_config_from_hf(back) == model
    # Llama 3.1's RoPE scaling, in either style, and back
    assert model.rope_scaling_factor is None
    v4_scaled = {**HF_CONFIG, "rope_scaling": {**LLAMA3, "factor": 32.0}}
    scaled = hf_source.gpt_config_from_hf(v4_scaled)
    assert scaled.rope_scaling_factor == 32.0 and scaled.rotary_base == 500000.0
    v5["rope_parameters"] = {**LLAMA3, "rope_theta": 1234.0}
    assert hf_source.gpt_config_from_hf(v5).rope_scaling_factor == 8.0
    assert hf_source.gpt_config_from_hf(hf_target.hf_config_from_gpt(scaled)) == scaled
    with pytest.raises(ConversionError, match="RoPE scaling is LlamaForCausalLM's"):
        hf_target.hf_config_from_gpt(scaled, "MistralForCausalLM")
    # A mixture of experts has no Llama-family export (nor GPT-2's)
    moe = model.replace(num_experts=4)
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM"):
        with pytest.raises(ConversionError, match="needs a dense MLP"):
            hf_target.hf_config_from_gpt(moe, arch)


PHI3 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "original_max_position_embeddings": 16}  # fmt: skip


def test_longrope_from_transformers_4_and_5_configs():
    """Phi-3.5's own form (``rope_scaling`` with ``type``, the original length at the top) and
    transformers 5's (``rope_parameters``): the factors, the original length, and the attention
    factor transformers derives: from ``max_position_embeddings`` over the original length, else
    from a given ``factor``, else as given."""
    short, long = [1.0, 1.5, 2.0, 2.5], [1.0, 4.0, 9.0, 16.0]
    scaling = {"type": "longrope", "short_factor": short, "long_factor": long}
    v4 = {**HF_CONFIG, **PHI3, "rope_scaling": scaling}
    lr = hf_source.gpt_config_from_hf(v4).longrope
    assert (lr.short_factor, lr.long_factor, lr.original_max_positions) == (
        tuple(short),
        tuple(long),
        16,
    )
    assert lr.attention_factor == pytest.approx(math.sqrt(1 + math.log(64 / 16) / math.log(16)))
    v5 = {**HF_CONFIG, **PHI3, "rope_parameters": {
        "rope_type": "longrope", "short_factor": short, "long_factor": long,
        "original_max_position_embeddings": 16, "rope_theta": 1234.0, "factor": 2.0}}  # fmt: skip
    del v5["rope_theta"]
    lr5 = hf_source.gpt_config_from_hf(v5)
    assert lr5.rotary_base == 1234.0
    assert lr5.longrope.attention_factor == pytest.approx(math.sqrt(1 + math.log(2) / math.log(16)))
    v5["rope_parameters"]["attention_factor"] = 1.25
    assert hf_source.gpt_config_from_hf(v5).longrope.attention_factor == 1.25


def test_exported_config_loads_in_transformers():
    from transformers import AutoConfig

    model = hf_source.gpt_config_from_hf(HF_CONFIG)
    cfg = AutoConfig.for_model(**hf_target.hf_config_from_gpt(model))
    assert cfg.num_key_value_heads == 2 and cfg.tie_word_embeddings is False
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    assert rope["rope_theta"] == 500000.0
    scaled = hf_source.gpt_config_from_hf({**HF_CONFIG, "rope_scaling": LLAMA3})
    cfg = AutoConfig.for_model(**hf_target.hf_config_from_gpt(scaled))
    rope = getattr(cfg, "rope_parameters", None) or cfg.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["GPTNeoXForCausalLM"]}, "unsupported architecture"),
        ({"architectures": None, "model_type": "qwen2"}, "unsupported architecture"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "RoPE scaling 'dynamic'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 0.5}}, "YaRN: the factor must be >= 1"),
        ({"rope_scaling": {**LLAMA3, "low_freq_factor": 2.0}}, "low_freq_factor 2.0 is not"),
        ({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 4096}}, "4096"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        # LongRoPE is Phi-3's (transformers' Llama has no cache reset at the switch)
        (
            {
                "rope_scaling": {
                    "type": "longrope",
                    "short_factor": [1.0] * 4,
                    "long_factor": [1.0] * 4,
                }
            },
            "'longrope' is not supported",
        ),  # fmt: skip
        ({**PHI3, "rope_scaling": {"type": "su", "short_factor": [1.0] * 4}}, "without long_f"),
        (
            {
                **PHI3,
                "rope_scaling": {
                    "type": "longrope",
                    "short_factor": [1.0] * 3,
                    "long_factor": [1.0] * 3,
                },
            },
            "3 short and 3 long factors",
        ),  # fmt: skip
    ],
)
def test_unsupported_configs(tmp_path, change, message):
    _write_hf(tmp_path, {**HF_CONFIG, **change}, tensors={"x": torch.zeros(1)})
    with pytest.raises(ConversionError, match=message) as err:
        hf_source.gpt_config_from_hf(
            hf_source.read_hf_config(str(tmp_path)), str(tmp_path / "config.json")
        )
    assert "config.json" in str(err.value)


def test_missing_config_and_weight_files(tmp_path):
    with pytest.raises(ConversionError, match="config.json: not found"):
        hf_source.read_hf_config(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(HF_CONFIG, f)
    with pytest.raises(ConversionError, match="no weight file found"):
        hf_source.HFWeights(str(tmp_path))


def test_missing_shard_named(tmp_path):
    _write_hf(tmp_path, shards=2)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(ConversionError, match=r"model-00002-of-00002\.safetensors: weight file"):
        hf_source.HFWeights(str(tmp_path))


def test_shape_mismatch_and_missing_tensor_named(tmp_path):
    model = hf_source.gpt_config_from_hf(HF_CONFIG)
    tensors = {n: torch.zeros(s) for n, s in hf_source.expected_hf_shapes(model).items()}
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 32)
    _write_hf(tmp_path / "a", tensors=tensors)
    with pytest.raises(
        ConversionError,
        match=r"model\.layers\.1\.self_attn\.k_proj\.weight in .*model\.safetensors",
    ) as err:
        hf_source.check_hf_weights(model, hf_source.HFWeights(str(tmp_path / "a")))
    assert "[32, 32]" in str(err.value) and "[16, 32]" in str(err.value)

    del tensors["model.layers.1.self_attn.k_proj.weight"]
    _write_hf(tmp_path / "b", tensors=tensors)
    with pytest.raises(ConversionError, match=r"k_proj\.weight not found"):
        hf_source.check_hf_weights(model, hf_source.HFWeights(str(tmp_path / "b")))

    tensors = {n: torch.zeros(s) for n, s in hf_source.expected_hf_shapes(model).items()}
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    _write_hf(tmp_path / "c", tensors=tensors)
    with pytest.raises(ConversionError, match=r"unsupported tensors.*q_proj\.bias"):
        hf_source.check_hf_weights(model, hf_source.HFWeights(str(tmp_path / "c")))


def test_vocabulary_larger_than_padded(tmp_path):
    _write_hf(tmp_path)
    model = hf_source.gpt_config_from_hf(HF_CONFIG)
    weights = hf_source.HFWeights(str(tmp_path))
    with pytest.raises(ConversionError, match=r"model\.embed_tokens\.weight: vocabulary of 100"):
        hf_source.megatron_tensor_from_hf("embedding.word_embeddings.weight", model, weights, 64)
    with pytest.raises(ConversionError, match=r"lm_head\.weight: vocabulary of 100 rows"):
        hf_source.megatron_tensor_from_hf("output_layer.weight", model, weights, 96)
    with pytest.raises(ConversionError, match=r"tokenizer /tok: vocabulary of 130 tokens"):
        hf_files.check_tokenizer_vocab("/tok", 130, model, 128)
    padded = hf_source.megatron_tensor_from_hf("output_layer.weight", model, weights, 128)
    assert padded.shape == (128, 32) and not padded[100:].any()


def test_layout_round_trip_and_qkv_order(tmp_path):
    tensors = _write_hf(tmp_path, shards=3)
    model = hf_source.gpt_config_from_hf(HF_CONFIG)
    weights = hf_source.HFWeights(str(tmp_path))
    hf_source.check_hf_weights(model, weights)
    names = ["embedding.word_embeddings.weight", "output_layer.weight"]
    names += ["decoder.final_layernorm.weight"]
    for i in range(2):
        names += [
            f"decoder.layers.{i}.{s}"
            for s in (
                "input_layernorm.weight",
                "self_attention.linear_qkv.weight",
                "self_attention.linear_proj.weight",
                "pre_mlp_layernorm.weight",
                "mlp.linear_fc1.weight",
                "mlp.linear_fc2.weight",
            )
        ]
    state = {n: hf_source.megatron_tensor_from_hf(n, model, weights, 128) for n in names}
    # Group 1 of layer 0: q heads 2, 3 then k head 1, v head 1 (head_dim 8).
    qkv = state["decoder.layers.0.self_attention.linear_qkv.weight"]
    p = "model.layers.0.self_attn."
    group1 = qkv[32:64]
    assert torch.equal(group1[:16], tensors[p + "q_proj.weight"][16:32])
    assert torch.equal(group1[16:24], tensors[p + "k_proj.weight"][8:16])
    assert torch.equal(group1[24:32], tensors[p + "v_proj.weight"][8:16])
    back = dict(hf_target.hf_tensors_from_megatron(state, model))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(back[name], t), name


def test_tp_shard_swiglu_and_vocab():
    full = torch.arange(8.0).reshape(8, 1)  # gate rows 0-3, up rows 4-7
    param = torch.zeros(4, 1)
    param.tensor_model_parallel, param.partition_dim = True, 0
    shard = tp_shard("decoder.layers.0.mlp.linear_fc1.weight", full, param, 2, 1)
    assert shard.flatten().tolist() == [2.0, 3.0, 6.0, 7.0]
    shard = tp_shard("output_layer.weight", full, param, 2, 1)
    assert shard.flatten().tolist() == [4.0, 5.0, 6.0, 7.0]


def test_sharded_export_and_bin_reading(tmp_path):
    tensors = {f"t{i}": torch.randn(64, 16) for i in range(5)}
    files = hf_files.write_hf_weights(iter(tensors.items()), str(tmp_path), max_shard_size="9KB")
    assert len(files) == 3 and os.path.isfile(tmp_path / "model.safetensors.index.json")
    weights = hf_source.HFWeights(str(tmp_path))
    assert all(torch.equal(weights.get(n), t) for n, t in tensors.items())
    torch.save(tensors, tmp_path / "bin_only.bin")
    os.makedirs(tmp_path / "bin")
    os.replace(tmp_path / "bin_only.bin", tmp_path / "bin" / "pytorch_model.bin")
    weights = hf_source.HFWeights(str(tmp_path / "bin"))
    assert weights.shape("t3") == (64, 16) and torch.equal(weights.get("t3"), tensors["t3"])
    with pytest.raises(ConversionError, match="tensor nope not found"):
        weights.get("nope")


def test_divisible_by_for_padded():
    assert divisible_by_for_padded(300, 512, 128, 2) == 128
    assert divisible_by_for_padded(300, 512, 128, 1) == 512
    with pytest.raises(ValueError, match="cannot be split over --tensor-model-parallel-size 5"):
        divisible_by_for_padded(300, 384, 128, 5)


QWEN_CONFIGS = {  # the published config.json fields that shape the models
    "Qwen3-0.6B": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    "Qwen2.5-0.5B": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
        intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", QWEN_CONFIGS)
def test_qwen_configs_count_what_transformers_builds(name):
    """Qwen3-0.6B (16 heads of 128 on a width of 1024, QK norm) and Qwen2.5-0.5B (QKV biases)
    read as the architectures transformers builds from the same config: the same parameter
    count (transformers' model on the meta device; tied embeddings counted once)."""
    import transformers

    cfg = QWEN_CONFIGS[name]
    arch = hf_source.gpt_config_from_hf(cfg)
    assert arch.head_dim == cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    family = cfg["architectures"][0].removesuffix("ForCausalLM")
    hf_cfg = getattr(transformers, f"{family}Config")(
        **{k: v for k, v in cfg.items() if k != "architectures"}
    )
    with torch.device("meta"):
        hf = getattr(transformers, f"{family}ForCausalLM")(hf_cfg)
    theirs = sum(p.numel() for p in hf.parameters())
    assert arch.replace(tied_embeddings=True).num_parameters() == theirs
