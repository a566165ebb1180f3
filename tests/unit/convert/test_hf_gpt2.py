"""GPT-3's architecture <-> Hugging Face GPT2LMHeadModel: a tiny megatron model's export loaded by
``transformers`` gives our logits, for each activation GPT-2 has, and reads back as the same
tensors, also under OpenAI's released names (no ``transformer.`` prefix, mask buffers); GPT-2's
config maps to the architecture transformers counts; mixed architectures and a Llama target are
refused. Llama's architecture with tied embeddings (Llama 3.2 1B's) exports as a tied
LlamaForCausalLM. (Whole-model import at TP 1 and 2: tests/functional/test_hf_interop.py.)"""

import json
import re

import pytest
import torch

from megatron_slm.convert import ConversionError
from megatron_slm.convert.hf import export_architecture
from megatron_slm.convert.hf_files import write_hf_weights
from megatron_slm.convert.hf_gpt2 import (
    GPT2_ACTIVATIONS,
    gpt2_config_from_gpt,
    gpt2_tensors_from_megatron,
)
from megatron_slm.models.presets import GPT3_KIND, get_preset
from megatron_slm.runtime.hf_source import (
    HFWeights,
    check_hf_weights,
    gpt_config_from_hf,
    megatron_tensor_from_hf,
)
from tests.dist_helpers import run_distributed

pytest.importorskip("transformers")

GPT3 = get_preset("tiny").replace(**GPT3_KIND, num_query_groups=4, ffn_hidden_size=256)
VOCAB = 500  # padded to 512: the export drops 12 rows
VARIANTS = {
    "tied, biases": GPT3.replace(vocab_size=VOCAB),
    "untied, no biases": GPT3.replace(
        vocab_size=VOCAB, tied_embeddings=False, add_bias_linear=False
    ),
    "tied, tanh GeLU": GPT3.replace(vocab_size=VOCAB, activation="openai_gelu"),
    "untied, squared ReLU": GPT3.replace(
        vocab_size=VOCAB, tied_embeddings=False, activation="squared_relu"
    ),
}


def _tiny_models(rank, world, tokens, variants):
    """In a spawned rank: each of ``variants`` built at TP=1 with random weights (norm weights
    about 1, biases not zero, so a misplaced one shows): its full state dict and fp32 logits."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_slm.models import ModelBuildOptions, build_model
    from megatron_slm.models.sharding import full_state_dict
    from megatron_slm.platform import enable_cpu_backend

    enable_cpu_backend()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(11)
    out = {}
    for name, cfg in variants.items():
        (model,) = build_model(cfg, ModelBuildOptions(transformer_impl="torch"))
        model.eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "layernorm.weight" in pname:
                    p.uniform_(0.5, 1.5)
                elif pname.endswith(".bias"):
                    p.normal_(0.0, 0.1)
            position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
            logits = model(tokens, position_ids, None)  # no labels: [b, s, padded vocab]
        state = {k: v.clone() for k, v in full_state_dict(model).items()}
        out[name] = state, logits
    return out


def test_gpt3_architecture_exports_as_gpt2_with_our_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    (models,) = run_distributed(_tiny_models, 1, tokens, VARIANTS)
    for name, cfg in VARIANTS.items():
        state, ours = models[name]
        assert ours.shape == (3, 24, 512), name
        assert ("output_layer.weight" in state) == (not cfg.tied_embeddings), name
        assert any(k.endswith("linear_fc1.bias") for k in state) == cfg.add_bias_linear, name
        out = tmp_path / name.replace(", ", "_").replace(" ", "-")
        out.mkdir()
        hf_cfg = gpt2_config_from_gpt(cfg)
        assert export_architecture(cfg) == hf_cfg["architectures"][0] == "GPT2LMHeadModel"
        assert hf_cfg["activation_function"] == GPT2_ACTIVATIONS[cfg.activation], name
        assert hf_cfg["n_inner"] == 256
        assert hf_cfg["tie_word_embeddings"] == cfg.tied_embeddings
        (out / "config.json").write_text(json.dumps(hf_cfg))
        tensors = dict(gpt2_tensors_from_megatron(state, cfg))
        assert ("lm_head.weight" in tensors) == (not cfg.tied_embeddings), name
        if not cfg.add_bias_linear:  # GPT-2 always has biases: zero ones stand for none
            assert not tensors["transformer.h.0.attn.c_attn.bias"].any()
        write_hf_weights(iter(tensors.items()), str(out))
        hf, info = AutoModelForCausalLM.from_pretrained(
            str(out), dtype=torch.float32, output_loading_info=True
        )
        assert type(hf).__name__ == "GPT2LMHeadModel"
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
        assert hf.lm_head.weight.shape == (VOCAB, 64)
        if cfg.tied_embeddings:
            assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
        with torch.no_grad():
            theirs = hf.eval()(tokens).logits
        torch.testing.assert_close(theirs, ours[..., :VOCAB], rtol=1e-5, atol=1e-5, msg=name)
        _reads_back(out, cfg, state)


def _reads_back(hf_dir, cfg, state):
    """The GPT-2 directory imports as ``cfg`` with ``state``'s tensors (the vocabulary's padding
    rows zero); a model without biases reads GPT-2's zero biases as biases."""
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    imported = gpt_config_from_hf(hf_cfg)
    assert imported == cfg.replace(add_bias_linear=True, init_method_std=0.02)
    weights = HFWeights(str(hf_dir))
    check_hf_weights(imported, weights, cfg.tied_embeddings)
    for name, ours in state.items():
        theirs = megatron_tensor_from_hf(name, imported, weights, 512)
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert not theirs[VOCAB:].any()
            ours, theirs = ours[:VOCAB], theirs[:VOCAB]
        assert torch.equal(theirs, ours), (hf_dir.name, name)


def test_openai_released_names_read_as_gpt2(tmp_path):
    """OpenAI's checkpoints: no ``transformer.`` prefix, each layer's causal-mask buffers, and
    no activation_function or tie_word_embeddings in config.json (GPT-2's defaults: tanh GeLU,
    tied)."""
    from safetensors.torch import save_file

    cfg = VARIANTS["tied, tanh GeLU"]
    (models,) = run_distributed(_tiny_models, 1, torch.zeros(1, 4, dtype=torch.long), {"m": cfg})
    state = models["m"][0]
    tensors = {k.removeprefix("transformer."): v.contiguous()
               for k, v in gpt2_tensors_from_megatron(state, cfg)}  # fmt: skip
    for i in range(cfg.num_layers):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 256, 256))
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    hf_cfg = gpt2_config_from_gpt(cfg)
    for key in ("activation_function", "tie_word_embeddings", "initializer_range"):
        del hf_cfg[key]
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    _reads_back(tmp_path, cfg, state)
    # A tensor of neither scheme is refused, naming it
    save_file({**tensors, "h.0.attn.extra": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match="unsupported tensors .*: h.0.attn.extra$"):
        check_hf_weights(cfg, HFWeights(str(tmp_path)), True)


def test_gpt2_configs_map_to_transformers_parameter_counts():
    """GPT-2 small and medium as released (transformers' defaults and n_inner None) count what
    transformers counts, built on the meta device; unsupported variants are refused."""
    from transformers import GPT2Config, GPT2LMHeadModel

    for sizes in ({}, {"n_embd": 1024, "n_layer": 24, "n_head": 16}):
        config = GPT2Config(**sizes)
        hf_cfg = {**config.to_dict(), "architectures": ["GPT2LMHeadModel"]}
        ours = gpt_config_from_hf(hf_cfg)
        assert (ours.activation, ours.tied_embeddings, ours.kind_name()) == (
            "openai_gelu", True, "GPT-2"
        )  # fmt: skip
        with torch.device("meta"):
            hf = GPT2LMHeadModel(config)
        assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert gpt_config_from_hf(hf_cfg | {"activation_function": "gelu"}).kind == GPT3_KIND
    for change, message in (
        ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=true"),
        ({"scale_attn_weights": False}, "scale_attn_weights=false is not supported"),
    ):
        with pytest.raises(ConversionError, match=message):
            gpt_config_from_hf(hf_cfg | change)


@pytest.mark.parametrize(
    "change, message",
    [
        (  # RMSNorm with learned positions
            {"normalization": "RMSNorm"},
            re.escape(
                "Llama, Qwen, Phi-3, Mixtral, Qwen-MoE, GLM-4.5, Nemotron and GPT-2 cannot "
                "represent this "
                "checkpoint's custom architecture (RMSNorm, GeLU, learned positions, biases, tied "
                "embeddings): LlamaForCausalLM/MistralForCausalLM needs SwiGLU, RoPE, no biases; "
                "Qwen2ForCausalLM needs SwiGLU, RoPE, biases on Q, K and V only; Qwen3ForCausalLM "
                "needs SwiGLU, RoPE, no biases, QK norm; Phi3ForCausalLM needs SwiGLU, RoPE, no "
                "biases; MixtralForCausalLM needs SwiGLU, RoPE, no biases, a mixture of experts "
                "(--num-experts); Qwen2MoeForCausalLM needs SwiGLU, RoPE, biases on Q, K and V "
                "only, a mixture of experts (--num-experts), a gated shared expert "
                "(--moe-shared-expert-intermediate-size, --moe-shared-expert-gate); "
                "Qwen3MoeForCausalLM needs SwiGLU, RoPE, no biases, QK norm, a mixture of experts "
                "(--num-experts); Glm4MoeForCausalLM needs SwiGLU, RoPE, a mixture of experts "
                "(--num-experts), a sigmoid router (--moe-router-score-function sigmoid), an "
                "expert bias (--moe-router-enable-expert-bias); NemotronForCausalLM needs "
                "LayerNorm, LayerNorm 1p, squared ReLU, RoPE, no biases; GPT2LMHeadModel needs "
                "LayerNorm"
            ),
        ),
        (  # SwiGLU with LayerNorm
            {"activation": "swiglu"},
            "; GPT2LMHeadModel needs an ungated MLP \\(GeLU, tanh GeLU or squared ReLU\\)$",
        ),
        (
            {"num_query_groups": 2},  # grouped-query attention with GPT-3's choices
            "GPT2LMHeadModel needs multi-head attention \\(not 4 heads in 2 KV groups\\)$",
        ),
    ],
)
def test_mixed_architectures_are_refused(change, message):
    with pytest.raises(ConversionError, match=message) as err:
        export_architecture(GPT3.replace(**change))
    assert "\n" not in str(err.value)


def test_targets_follow_the_architecture():
    with pytest.raises(ConversionError) as err:
        export_architecture(GPT3, "LlamaForCausalLM")
    assert str(err.value) == (
        "--architecture LlamaForCausalLM: this checkpoint's GPT-3 architecture (LayerNorm, GeLU, "
        "learned positions, biases, tied embeddings) exports as GPT2LMHeadModel; "
        "LlamaForCausalLM/MistralForCausalLM needs RMSNorm, SwiGLU, RoPE, no biases"
    )
    with pytest.raises(ConversionError, match="Llama architecture .* exports as LlamaForCausal"):
        export_architecture(get_preset("tiny"), "GPT2LMHeadModel")
    with pytest.raises(ConversionError, match="GPT2LMHeadModel needs LayerNorm, an ungated MLP"):
        gpt2_config_from_gpt(get_preset("tiny"))
    # Llama's unchanged: the request, else the imported architecture, else LlamaForCausalLM
    llama = get_preset("tiny")
    assert export_architecture(llama) == "LlamaForCausalLM"
    assert export_architecture(llama, None, "MistralForCausalLM") == "MistralForCausalLM"
    assert export_architecture(llama, "MistralForCausalLM", "LlamaForCausalLM").startswith("Mis")
    assert export_architecture(GPT3, "GPT2LMHeadModel", "LlamaForCausalLM") == "GPT2LMHeadModel"
    # a sliding window is Mistral's alone (its export: tests/functional/test_hf_interop)
    windowed = llama.replace(window_size=4095)
    assert export_architecture(windowed, None, "LlamaForCausalLM") == "MistralForCausalLM"
    with pytest.raises(ConversionError, match="needs no sliding window \\(--window-size: Mis"):
        export_architecture(windowed, "LlamaForCausalLM")
    with pytest.raises(ConversionError, match="Qwen2ForCausalLM needs .*no sliding window"):
        export_architecture(windowed.replace(add_qkv_bias=True))
    # Qwen's additions pick Qwen's architectures (their export: tests/functional/test_hf_interop)
    assert export_architecture(llama.replace(add_qkv_bias=True)) == "Qwen2ForCausalLM"
    assert export_architecture(llama.replace(qk_layernorm=True)) == "Qwen3ForCausalLM"
    with pytest.raises(ConversionError, match="Qwen3ForCausalLM needs QK norm$"):
        export_architecture(llama, "Qwen3ForCausalLM")


def test_llama_with_tied_embeddings_exports_as_a_tied_llama(tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_slm.convert.hf_target import hf_config_from_gpt, hf_tensors_from_megatron

    cfg = get_preset("tiny").replace(vocab_size=VOCAB, tied_embeddings=True)
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    (models,) = run_distributed(_tiny_models, 1, tokens, {"tied": cfg})
    state, ours = models["tied"]
    assert "output_layer.weight" not in state
    assert export_architecture(cfg) == "LlamaForCausalLM"
    hf_cfg = hf_config_from_gpt(cfg)
    assert hf_cfg["tie_word_embeddings"] is True
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    tensors = dict(hf_tensors_from_megatron(state, cfg))
    assert "lm_head.weight" not in tensors
    write_hf_weights(iter(tensors.items()), str(tmp_path))
    hf, info = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, output_loading_info=True
    )
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        theirs = hf.eval()(tokens).logits
    torch.testing.assert_close(theirs, ours[..., :VOCAB], rtol=1e-5, atol=1e-5)
