"""megatron-core GPT -> Hugging Face Llama / Mistral / Qwen / Mixtral / Qwen-MoE / GLM-4.5: the
config and the tensors (the mirror of ``runtime.hf_source``, which reads the other way;
``convert.hf`` explains both layouts), what a model needs to export as one of them, and the dtypes
and token ids every export target shares (GPT-2's config and tensors: ``convert.hf_gpt2``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megatron_slm.errors import ConfigError
from megatron_slm.models.presets import GPTModelConfig
from megatron_slm.runtime.hf_moe import (
    GLM4_MOE,
    MIXTRAL,
    MOE_ARCHITECTURES,
    QWEN2_MOE,
    QWEN3_MOE,
    moe_hf_config,
    moe_hf_tensors,
    moe_megatron_names,
)
from megatron_slm.runtime.hf_source import (
    _LAYER_MAP,
    _NORM_BIASES,
    _QK_NORMS,
    _QKV_BIAS,
    LLAMA3_ROPE,
    SUPPORTED_ARCHITECTURES,
    ConversionError,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# What each Hugging Face family of Llama's design needs of a model: (field, value, as said).
_DENSE = ("mixture", False, "a dense MLP (no --num-experts; MixtralForCausalLM, "
          "Qwen2MoeForCausalLM, Qwen3MoeForCausalLM or Glm4MoeForCausalLM)")  # fmt: skip
_MIXTURE = ("mixture", True, "a mixture of experts (--num-experts)")
_SOFTMAX_ROUTER = (("moe_router_score_function", "softmax",
                    "a softmax router (no --moe-router-score-function sigmoid)"),
                   ("moe_router_topk_scaling_factor", None,
                    "no --moe-router-topk-scaling-factor"),
                   ("moe_router_num_groups", None, "no group-limited routing"))  # fmt: skip
_NO_SHARED_EXPERT = ("moe_shared_expert_intermediate_size", None,
                     "no shared expert (--moe-shared-expert-intermediate-size: "
                     "Qwen2MoeForCausalLM)")  # fmt: skip
_LLAMA_SHARED = (("normalization", "RMSNorm", "RMSNorm"), ("activation", "swiglu", "SwiGLU"),
                 ("position_embedding_type", "rope", "RoPE"),
                 ("apply_layernorm_1p", False,
                  "plain norm weights (no --apply-layernorm-1p)"))  # fmt: skip
_LLAMA_BASE = (*_LLAMA_SHARED, _DENSE)
_NO_LONGROPE = ("longrope", None, "no LongRoPE (Phi3ForCausalLM)")
_LLAMA_CORE = (*_LLAMA_BASE, ("rotary_percent", 1.0, "RoPE on whole heads"), _NO_LONGROPE)
_FULL_ATTENTION = ("window_size", None, "no sliding window (--window-size: MistralForCausalLM)")
FAMILIES = {
    "LlamaForCausalLM/MistralForCausalLM": (
        ("LlamaForCausalLM", "MistralForCausalLM"),
        (*_LLAMA_CORE, ("biases", "none", "no biases"), ("qk_layernorm", False, "no QK norm")),
    ),
    "Qwen2ForCausalLM": (
        ("Qwen2ForCausalLM",),
        (*_LLAMA_CORE, ("biases", "qkv", "biases on Q, K and V only"),
         ("qk_layernorm", False, "no QK norm"), _FULL_ATTENTION),
    ),
    "Qwen3ForCausalLM": (
        ("Qwen3ForCausalLM",),
        (*_LLAMA_CORE, ("biases", "none", "no biases"), ("qk_layernorm", True, "QK norm"),
         _FULL_ATTENTION),
    ),
    "Phi3ForCausalLM": (  # fused projections; any share of each head rotated, a window or none
        ("Phi3ForCausalLM",),
        (*_LLAMA_BASE, ("biases", "none", "no biases"), ("qk_layernorm", False, "no QK norm"),
         ("kv_channels", None, "heads that split the width"),
         ("rope_scaling_factor", None, "no Llama 3 RoPE scaling"),
         ("rope_interpolation_factor", None, "no RoPE position interpolation")),
    ),
    MIXTRAL: (  # Mistral's with a mixture of experts in every layer, a window or none
        (MIXTRAL,),
        (*_LLAMA_SHARED, ("rotary_percent", 1.0, "RoPE on whole heads"), _NO_LONGROPE,
         ("biases", "none", "no biases"), ("qk_layernorm", False, "no QK norm"), _MIXTURE,
         ("moe_router_pre_softmax", False, "Mixtral's router (no --moe-router-pre-softmax)"),
         ("moe_layer_freq", None, "a mixture in every layer (no --moe-layer-freq)"),
         _NO_SHARED_EXPERT, *_SOFTMAX_ROUTER),
    ),
    QWEN2_MOE: (  # Qwen2's with mixtures (and dense layers) whose shared expert is gated
        (QWEN2_MOE,),
        (*_LLAMA_SHARED, ("rotary_percent", 1.0, "RoPE on whole heads"), _NO_LONGROPE,
         ("biases", "qkv", "biases on Q, K and V only"), ("qk_layernorm", False, "no QK norm"),
         _FULL_ATTENTION, _MIXTURE, *_SOFTMAX_ROUTER,
         ("moe_shared_expert_gate", True,
          "a gated shared expert (--moe-shared-expert-intermediate-size, "
          "--moe-shared-expert-gate)")),
    ),
    QWEN3_MOE: (  # Qwen3's with mixtures (and dense layers)
        (QWEN3_MOE,),
        (*_LLAMA_SHARED, ("rotary_percent", 1.0, "RoPE on whole heads"), _NO_LONGROPE,
         ("biases", "none", "no biases"), ("qk_layernorm", True, "QK norm"), _FULL_ATTENTION,
         _MIXTURE, _NO_SHARED_EXPERT, *_SOFTMAX_ROUTER),
    ),
    GLM4_MOE: (  # DeepSeek-V3's router, QKV biases and QK norm or not, partial RoPE
        (GLM4_MOE,),
        (*_LLAMA_SHARED, _NO_LONGROPE, _FULL_ATTENTION, _MIXTURE,
         ("moe_router_score_function", "sigmoid", "a sigmoid router (--moe-router-score-function "
          "sigmoid)"),
         ("moe_router_enable_expert_bias", True, "an expert bias "
          "(--moe-router-enable-expert-bias)"),
         ("moe_shared_expert_gate", False, "an ungated shared expert (no "
          "--moe-shared-expert-gate)")),
    ),
    "NemotronForCausalLM": (  # any share of each head rotated
        ("NemotronForCausalLM",),
        (("normalization", "LayerNorm", "LayerNorm"),
         ("apply_layernorm_1p", True, "LayerNorm 1p"),
         ("activation", "squared_relu", "squared ReLU"),
         ("position_embedding_type", "rope", "RoPE"),
         ("biases", "none", "no biases"), ("qk_layernorm", False, "no QK norm"),
         _FULL_ATTENTION, _NO_LONGROPE, _DENSE),
    ),
}  # fmt: skip
"""Family name -> (its architectures, what it needs); tied embeddings or not, all export
(``tie_word_embeddings`` says which)."""
ARCHITECTURE_NEEDS = {"LlamaForCausalLM": (_FULL_ATTENTION,)}
"""What one architecture needs beyond its family's (Llama and Mistral differ in the window)."""


def _unmet(model: GPTModelConfig, needs) -> list[str]:
    return [text for name, value, text in needs if getattr(model, name) != value]


def family_mismatches(model: GPTModelConfig) -> dict[str, list[str]]:
    """For each family of :data:`FAMILIES`, what it would need that ``model`` lacks."""
    return {family: _unmet(model, needs) for family, (_, needs) in FAMILIES.items()}


def architecture_mismatches(model: GPTModelConfig, arch: str) -> list[str]:
    """What architecture ``arch`` of :data:`FAMILIES` would need that ``model`` lacks."""
    family_needs = FAMILIES[family_of(arch)][1]
    return _unmet(model, (*family_needs, *ARCHITECTURE_NEEDS.get(arch, ())))


def family_of(arch: str) -> str | None:
    """The :data:`FAMILIES` name of a Hugging Face architecture."""
    return next((f for f, (archs, _) in FAMILIES.items() if arch in archs), None)


def token_ids(source: dict) -> dict:
    """``bos``/``eos`` (and ``pad``, when it has one) token ids of an imported model's original
    config ``source``; 1 and 2 without one (an exported tokenizer's own ids replace them)."""
    ids = {
        "bos_token_id": source.get("bos_token_id", 1),
        "eos_token_id": source.get("eos_token_id", 2),
    }
    if source.get("pad_token_id") is not None:
        ids["pad_token_id"] = source["pad_token_id"]
    return ids


def _rope_scaling(model: GPTModelConfig) -> dict | None:
    """``rope_scaling`` as transformers reads it: Llama 3's, linear interpolation, LongRoPE,
    YaRN (every parameter written, the attention factor too), or none."""
    if model.rope_scaling_factor is not None:
        return {"rope_type": "llama3", "factor": model.rope_scaling_factor, **LLAMA3_ROPE}
    if model.rope_interpolation_factor is not None:
        return {"rope_type": "linear", "factor": model.rope_interpolation_factor}
    if model.longrope is not None:  # Phi-3.5's own form, which transformers 4 and 5 read
        lr = model.longrope
        out = {"type": "longrope", "short_factor": list(lr.short_factor),
               "long_factor": list(lr.long_factor)}  # fmt: skip
        if lr.attention_factor != lr.derived_attention_factor(
            model.max_position_embeddings / lr.original_max_positions, lr.original_max_positions
        ):
            out["attention_factor"] = lr.attention_factor
        return out
    if model.yarn is not None:
        y = model.yarn
        return {"rope_type": "yarn", "factor": y.factor,
                "original_max_position_embeddings": y.original_max_positions,
                "attention_factor": y.attention_factor, "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow, "truncate": y.truncate}  # fmt: skip
    return None


def hf_config_from_gpt(
    model: GPTModelConfig,
    arch: str = "LlamaForCausalLM",
    dtype: torch.dtype = torch.float32,
    source: dict | None = None,
) -> dict:
    """A ``config.json`` for ``transformers`` (4.x and 5.x read it). ``source`` is the original HF
    config of an imported model: token ids and the sliding window are taken from it."""
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"--architecture {arch!r} is not supported; choose one of "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    gaps = architecture_mismatches(model, arch)
    if gaps:
        raise ConversionError(f"--architecture {arch} needs {', '.join(gaps)}")
    source = source or {}
    if model.rope_scaling_factor is not None and arch != "LlamaForCausalLM":
        raise ConversionError(
            f"--architecture {arch}: Llama 3's RoPE scaling is LlamaForCausalLM's"
        )
    if model.rope_scaling_factor is not None and model.rope_interpolation_factor is not None:
        raise ConversionError(
            f"--architecture {arch}: Hugging Face's rope_scaling holds one kind, not both Llama "
            "3's scaling and a linear position interpolation"
        )
    if model.rotary_base != int(model.rotary_base):
        raise ConversionError(f"rotary_base {model.rotary_base} is not an integer")
    cfg = {
        "architectures": [arch],
        "model_type": SUPPORTED_ARCHITECTURES[arch],
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "num_hidden_layers": model.num_layers,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": float(model.rotary_base),
        "rope_scaling": _rope_scaling(model),
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "initializer_range": model.init_method_std,
        "tie_word_embeddings": model.tied_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype_name(dtype),
        **token_ids(source),
    }
    if arch == "LlamaForCausalLM":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif arch == "NemotronForCausalLM":  # transformers 4 and 5 read the top-level keys
        del cfg["rms_norm_eps"]
        cfg.update(hidden_act="relu2", norm_eps=model.norm_epsilon, attention_bias=False,
                   mlp_bias=False, partial_rotary_factor=model.rotary_percent)  # fmt: skip
    elif arch == "Phi3ForCausalLM":  # (transformers 4 and 5 read the top-level keys)
        window = model.window_size
        cfg.update(sliding_window=None if window is None else window + 1,
                   partial_rotary_factor=model.rotary_percent, attention_bias=False,
                   resid_pdrop=0.0, embd_pdrop=0.0,
                   original_max_position_embeddings=model.max_position_embeddings)  # fmt: skip
        if model.longrope is not None:
            cfg["original_max_position_embeddings"] = model.longrope.original_max_positions
    elif arch in ("MistralForCausalLM", MIXTRAL):  # (W = the token and the W - 1 before it)
        window = model.window_size
        cfg["sliding_window"] = source.get("sliding_window") if window is None else window + 1
    elif arch != GLM4_MOE:  # Qwen2 (QKV biases), Qwen3 (QK norm), their mixtures: full attention
        # (GLM-4.5's config has no window keys)
        cfg.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=model.num_layers)  # fmt: skip
        if arch in ("Qwen3ForCausalLM", QWEN3_MOE):
            cfg["attention_bias"] = False
    if arch in MOE_ARCHITECTURES:  # (transformers' training-time router options: the source's)
        try:
            cfg.update(moe_hf_config(model, arch, source))
        except ConfigError as e:
            raise ConversionError(f"--architecture {arch}: {e}") from None
    return cfg


def check_state_names(state: dict[str, torch.Tensor], expected: set[str]) -> None:
    """A full megatron state dict holds exactly the ``expected`` tensors (an export target's)."""
    missing = sorted(expected - set(state))
    if missing:
        raise ConversionError(f"checkpoint lacks tensors: {', '.join(missing[:8])}")
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ConversionError(f"checkpoint has unsupported tensors: {', '.join(unexpected[:8])}")


def _fc1(state: dict, name: str, shape: tuple[int, int]) -> torch.Tensor:
    fc1 = state[name]
    if fc1.shape != shape:
        raise ConversionError(
            f"tensor {name} has shape {list(fc1.shape)}, the model config implies {list(shape)}"
        )
    return fc1


def hf_tensors_from_megatron(
    state: dict[str, torch.Tensor], model: GPTModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors from a full (TP=1, PP=1) megatron state dict; vocabulary padding dropped."""
    layer_norm = model.normalization == "LayerNorm"  # (Nemotron's: with biases)
    expected = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"}
    if layer_norm:
        expected.add("decoder.final_layernorm.bias")
    if not model.tied_embeddings:  # tied: the output layer reads the embedding
        expected.add("output_layer.weight")
    extras = (*_QKV_BIAS,) if model.add_qkv_bias else ()
    extras += (*_QK_NORMS,) if model.qk_layernorm else ()
    extras += (*_NORM_BIASES,) if layer_norm else ()
    dense = ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
    moe = moe_megatron_names(model) if model.mixture else ()
    per_layer = (*(n for n in _LAYER_MAP if not n.startswith("mlp.")),
                 "self_attention.linear_qkv.weight", *extras)  # fmt: skip
    for i, is_moe in enumerate(model.moe_layers):
        expected.update(
            f"decoder.layers.{i}.{s}" for s in (*per_layer, *(moe if is_moe else dense))
        )
    check_state_names(state, expected)

    def vocab(name: str) -> torch.Tensor:
        t = state[name]
        if t.shape[0] < model.vocab_size:
            raise ConversionError(
                f"tensor {name} has {t.shape[0]} rows, fewer than vocab_size {model.vocab_size}"
            )
        return t[: model.vocab_size]

    yield "model.embed_tokens.weight", vocab("embedding.word_embeddings.weight")
    ng, h, d = model.num_query_groups, model.hidden_size, model.head_dim
    r, f = model.num_attention_heads // ng, model.ffn_hidden_size
    f_rows = 2 * f if model.gated else f  # [gate; up], or up alone
    for i in range(model.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "self_attention.linear_qkv.weight"]
        if qkv.shape != (ng * (r + 2) * d, h):
            raise ConversionError(
                f"tensor {src}self_attention.linear_qkv.weight has shape {list(qkv.shape)}, "
                f"the model config implies {[ng * (r + 2) * d, h]}"
            )
        q, k, v = qkv.reshape(ng, (r + 2) * d, h).split([r * d, d, d], dim=1)
        yield dst + "input_layernorm.weight", state[src + "input_layernorm.weight"]
        for ours, theirs in _NORM_BIASES.items() if layer_norm else ():
            yield dst + theirs, state[src + ours]
        yield dst + "self_attn.q_proj.weight", q.reshape(ng * r * d, h)
        yield dst + "self_attn.k_proj.weight", k.reshape(ng * d, h)
        yield dst + "self_attn.v_proj.weight", v.reshape(ng * d, h)
        if model.add_qkv_bias:  # group-interleaved like the weight's rows
            bias = state[src + "self_attention.linear_qkv.bias"]
            qb, kb, vb = bias.reshape(ng, (r + 2) * d).split([r * d, d, d], dim=1)
            yield dst + "self_attn.q_proj.bias", qb.reshape(-1)
            yield dst + "self_attn.k_proj.bias", kb.reshape(-1)
            yield dst + "self_attn.v_proj.bias", vb.reshape(-1)
        for ours, theirs in _QK_NORMS.items() if model.qk_layernorm else ():
            yield dst + theirs, state[src + ours]
        yield dst + "self_attn.o_proj.weight", state[src + "self_attention.linear_proj.weight"]
        yield dst + "post_attention_layernorm.weight", state[src + "pre_mlp_layernorm.weight"]
        if model.moe_layers[i]:  # (Qwen-MoE's names; Mixtral's: ``hf_moe.mixtral_names``)
            yield from moe_hf_tensors(state, model, src, dst, _fc1)
            continue
        fc1 = _fc1(state, src + "mlp.linear_fc1.weight", (f_rows, h))
        if model.gated:
            yield dst + "mlp.gate_proj.weight", fc1[:f]
        yield dst + "mlp.up_proj.weight", fc1[-f:]
        yield dst + "mlp.down_proj.weight", state[src + "mlp.linear_fc2.weight"]
    yield "model.norm.weight", state["decoder.final_layernorm.weight"]
    if layer_norm:
        yield "model.norm.bias", state["decoder.final_layernorm.bias"]
    if not model.tied_embeddings:
        yield "lm_head.weight", vocab("output_layer.weight")
