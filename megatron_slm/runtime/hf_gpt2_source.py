"""Read a Hugging Face ``GPT2LMHeadModel`` directory as megatron-core GPT-3's architecture: the
config mapping and the GPT-2 -> megatron tensor mapping (full tensors; ``runtime.hf_source``
dispatches here and shards them). ``convert.hf_gpt2`` writes the other way and explains the
layout: Conv1D weights are ``[in, out]``, ``c_attn`` packs all query heads, then all keys, then
all values, where megatron's ``linear_qkv`` interleaves ``[q_h, k_h, v_h]`` per head.

Two naming schemes exist: ``GPT2LMHeadModel.save_pretrained`` prefixes the body with
``transformer.``; OpenAI's released checkpoints (``gpt2``, ``gpt2-medium``, ...) were saved from
the bare ``GPT2Model`` and have no prefix. Both are read. Old checkpoints also carry each layer's
causal-mask buffers (``attn.bias``, ``attn.masked_bias``), which hold no weights.
"""

from __future__ import annotations

import re

import torch

from megatron_slm.models.presets import GPT3_KIND, GPTModelConfig
from megatron_slm.runtime.hf_source import ConversionError

# GPT-2's activation_function -> ours (gelu_new and gelu_pytorch_tanh: the same tanh formula).
ACTIVATIONS_FROM_GPT2 = {"gelu": "gelu", "gelu_new": "openai_gelu",
                         "gelu_pytorch_tanh": "openai_gelu", "relu2": "squared_relu"}  # fmt: skip
_BUFFERS = re.compile(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias")
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_ONE_TO_ONE = {  # megatron layer suffix -> GPT-2 block suffix
    "input_layernorm.weight": "ln_1.weight",
    "input_layernorm.bias": "ln_1.bias",
    "pre_mlp_layernorm.weight": "ln_2.weight",
    "pre_mlp_layernorm.bias": "ln_2.bias",
    "self_attention.linear_proj.bias": "attn.c_proj.bias",
    "mlp.linear_fc1.bias": "mlp.c_fc.bias",
    "mlp.linear_fc2.bias": "mlp.c_proj.bias",
}
_TRANSPOSED = {  # Conv1D weights, [in, out]
    "self_attention.linear_proj.weight": "attn.c_proj.weight",
    "mlp.linear_fc1.weight": "mlp.c_fc.weight",
    "mlp.linear_fc2.weight": "mlp.c_proj.weight",
}


def gpt_config_from_gpt2(cfg: dict, where: str = "config.json") -> GPTModelConfig:
    """The architecture of a GPT-2 config: GPT-3's (LayerNorm, learned positions, biases), its
    activation, tied as ``tie_word_embeddings`` says (GPT-2's default: tied)."""
    act = cfg.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS_FROM_GPT2:
        raise ConversionError(
            f"{where}: activation_function {act!r} is not supported "
            f"({', '.join(ACTIVATIONS_FROM_GPT2)})"
        )
    refused = {"scale_attn_weights": False, "scale_attn_by_inverse_layer_idx": True,
               "add_cross_attention": True}  # fmt: skip
    for key, value in refused.items():
        if key in cfg and bool(cfg[key]) == value:
            raise ConversionError(
                f"{where}: {key}={str(value).lower()} is not supported (megatron-core scales "
                "attention by 1/sqrt(head size) in every layer)"
            )
    h = cfg["n_embd"]
    return GPTModelConfig(
        num_layers=cfg["n_layer"],
        hidden_size=h,
        ffn_hidden_size=cfg.get("n_inner") or 4 * h,
        num_attention_heads=cfg["n_head"],
        num_query_groups=cfg["n_head"],
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["n_positions"],
        norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        **{**GPT3_KIND, "activation": ACTIVATIONS_FROM_GPT2[act],
           "tied_embeddings": bool(cfg.get("tie_word_embeddings", True))},
    )  # fmt: skip


def gpt2_prefix(weights) -> str:
    """``transformer.`` or nothing: the naming scheme of ``weights``."""
    for prefix in ("transformer.", ""):
        if f"{prefix}wte.weight" in weights:
            return prefix
    raise ConversionError(
        f"{weights.path}: neither transformer.wte.weight nor wte.weight is in the weight files "
        "(not a GPT-2 checkpoint)"
    )


def expected_gpt2_shapes(model: GPTModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-2 checkpoint of ``model`` has, with its shape (``lm_head.weight``
    only when untied)."""
    h, f, p = model.hidden_size, model.ffn_hidden_size, prefix
    shapes = {f"{p}wte.weight": (model.vocab_size, h),
              f"{p}wpe.weight": (model.max_position_embeddings, h),
              f"{p}ln_f.weight": (h,), f"{p}ln_f.bias": (h,)}  # fmt: skip
    if not model.tied_embeddings:
        shapes["lm_head.weight"] = (model.vocab_size, h)
    for i in range(model.num_layers):
        b = f"{p}h.{i}."
        shapes.update({b + theirs: (f,) if "c_fc" in theirs else (h,)
                       for theirs in _ONE_TO_ONE.values()})  # fmt: skip
        shapes.update({b + "attn.c_attn.weight": (h, 3 * h), b + "attn.c_attn.bias": (3 * h,),
                       b + "attn.c_proj.weight": (h, h), b + "mlp.c_fc.weight": (h, f),
                       b + "mlp.c_proj.weight": (f, h)})  # fmt: skip
    return shapes


def ignored_gpt2_tensor(name: str, tied: bool) -> bool:
    """Tensors a GPT-2 checkpoint may carry that are not weights of the model: the causal-mask
    buffers, and a tied model's copy of the embedding as ``lm_head.weight``."""
    return bool(_BUFFERS.fullmatch(name)) or (tied and name == "lm_head.weight")


def megatron_tensor_from_gpt2(
    name: str, model: GPTModelConfig, weights, prefix: str, pad_vocab
) -> torch.Tensor:
    """The full (TP=1) megatron tensor ``name`` (global layer numbering) from GPT-2 weights;
    ``pad_vocab(hf_name, tensor)`` pads the vocabulary rows."""
    p = prefix
    if name == "embedding.word_embeddings.weight":
        return pad_vocab(f"{p}wte.weight", weights.get(f"{p}wte.weight"))
    if name == "output_layer.weight":
        source = f"{p}wte.weight" if model.tied_embeddings else "lm_head.weight"
        return pad_vocab(source, weights.get(source))
    if name == "embedding.position_embeddings.weight":
        return weights.get(f"{p}wpe.weight")
    if name in ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias"):
        return weights.get(f"{p}ln_f.{name.rsplit('.', 1)[1]}")
    m = _LAYER.fullmatch(name)
    if not m:
        raise ConversionError(f"megatron parameter {name} has no GPT-2 counterpart")
    block, suffix = f"{p}h.{m.group(1)}.", m.group(2)
    if suffix in _ONE_TO_ONE:
        return weights.get(block + _ONE_TO_ONE[suffix])
    if suffix in _TRANSPOSED:
        return weights.get(block + _TRANSPOSED[suffix]).t().contiguous()
    n, d = model.num_attention_heads, model.head_dim
    if suffix == "self_attention.linear_qkv.weight":  # [h, 3h] -> rows [q_h, k_h, v_h] per head
        packed = weights.get(block + "attn.c_attn.weight").t()
        return packed.reshape(3, n, d, -1).transpose(0, 1).reshape(3 * n * d, -1).contiguous()
    if suffix == "self_attention.linear_qkv.bias":
        packed = weights.get(block + "attn.c_attn.bias")
        return packed.reshape(3, n, d).transpose(0, 1).reshape(-1).contiguous()
    raise ConversionError(f"megatron parameter {name} has no GPT-2 counterpart")
