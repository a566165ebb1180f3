"""megatron-core GPT <-> Hugging Face ``GPT2LMHeadModel``: the config and the tensors of GPT-3's
architecture (LayerNorm, learned absolute positions, multi-head attention, an ungated MLP: exact
GeLU, its tanh approximation (GPT-2's ``gelu_new``) or squared ReLU; biases and tied embeddings
optional), both ways.

Layout changes from megatron-core:

* GPT-2's linear layers are ``Conv1D``: weights stored ``[in, out]``, the transpose of
  ``nn.Linear``'s ``[out, in]``.
* ``c_attn`` packs ``[q of all heads; k of all heads; v of all heads]`` along its output; megatron's
  ``linear_qkv`` (multi-head: one head per key/value group) is head-interleaved,
  ``[q_h, k_h, v_h]`` for each head ``h``. The bias follows the weight.
* GPT-2 always has biases: a model without them (``add_bias_linear`` false) exports zero biases.
* Tied embeddings: no ``lm_head.weight`` (GPT-2 ties it to ``wte``); untied: megatron's output
  layer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megatron_slm.convert.hf_target import check_state_names, dtype_name, token_ids
from megatron_slm.models.presets import GPTModelConfig
from megatron_slm.runtime.hf_source import GPT2_ARCHITECTURE, ConversionError

# Our activation -> GPT-2's activation_function (runtime.hf_gpt2_source reads them back).
GPT2_ACTIVATIONS = {"gelu": "gelu", "openai_gelu": "gelu_new", "squared_relu": "relu2"}

_LINEAR = {  # megatron layer suffix -> GPT-2 block suffix (Conv1D: weight transposed)
    "self_attention.linear_proj": "attn.c_proj",
    "mlp.linear_fc1": "mlp.c_fc",
    "mlp.linear_fc2": "mlp.c_proj",
}
_NORMS = {"input_layernorm": "ln_1", "pre_mlp_layernorm": "ln_2"}


def gpt2_mismatches(model: GPTModelConfig) -> list[str]:
    """What ``GPT2LMHeadModel`` would need that ``model`` lacks (empty: it exports as GPT-2)."""
    gaps = []
    if model.normalization != "LayerNorm":
        gaps.append("LayerNorm")
    if model.activation not in GPT2_ACTIVATIONS:
        gaps.append("an ungated MLP (GeLU, tanh GeLU or squared ReLU)")
    if model.position_embedding_type != "learned_absolute":
        gaps.append("learned positions")
    if model.qk_layernorm:
        gaps.append("no QK norm")
    if model.window_size is not None:
        gaps.append("no sliding window")
    if model.num_experts is not None:
        gaps.append("a dense MLP (no --num-experts)")
    if model.apply_layernorm_1p:
        gaps.append("plain norm weights (no --apply-layernorm-1p)")
    if model.kv_channels is not None:
        gaps.append(f"heads that split the width (not {model.num_attention_heads} of "
                    f"{model.kv_channels})")  # fmt: skip
    if model.biases == "qkv":
        gaps.append("biases on every linear layer or none (not on QKV only)")
    if model.num_query_groups != model.num_attention_heads:
        gaps.append(
            f"multi-head attention (not {model.num_attention_heads} heads in "
            f"{model.num_query_groups} KV groups)"
        )
    return gaps


def gpt2_config_from_gpt(
    model: GPTModelConfig, dtype: torch.dtype = torch.float32, source: dict | None = None
) -> dict:
    """A ``config.json`` for ``GPT2LMHeadModel`` (transformers 4.x and 5.x read it); token ids
    from ``source`` as for Llama (:func:`convert.hf_target.token_ids`)."""
    gaps = gpt2_mismatches(model)
    if gaps:
        raise ConversionError(f"{GPT2_ARCHITECTURE} needs {', '.join(gaps)}")
    return {
        "architectures": [GPT2_ARCHITECTURE],
        "model_type": "gpt2",
        "n_embd": model.hidden_size,
        "n_layer": model.num_layers,
        "n_head": model.num_attention_heads,
        "n_inner": model.ffn_hidden_size,
        "n_positions": model.max_position_embeddings,
        "vocab_size": model.vocab_size,
        "activation_function": GPT2_ACTIVATIONS[model.activation],
        "layer_norm_epsilon": model.norm_epsilon,
        "tie_word_embeddings": model.tied_embeddings,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,  # 1/sqrt(head_dim), megatron-core's softmax scale
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "initializer_range": model.init_method_std,
        "use_cache": True,
        "torch_dtype": dtype_name(dtype),
        **token_ids(source or {}),
    }


def expected_megatron_names(model: GPTModelConfig) -> set[str]:
    """The tensors of a full (TP=1, PP=1) megatron state dict of ``model``."""
    names = {
        "embedding.word_embeddings.weight",
        "embedding.position_embeddings.weight",
        "decoder.final_layernorm.weight",
        "decoder.final_layernorm.bias",
    }
    if not model.tied_embeddings:
        names.add("output_layer.weight")
    params = ("weight", "bias") if model.add_bias_linear else ("weight",)
    for i in range(model.num_layers):
        p = f"decoder.layers.{i}."
        names.update(f"{p}{norm}.{s}" for norm in _NORMS for s in ("weight", "bias"))
        linears = ("self_attention.linear_qkv", *_LINEAR)
        names.update(f"{p}{linear}.{s}" for linear in linears for s in params)
    return names


def gpt2_tensors_from_megatron(
    state: dict[str, torch.Tensor], model: GPTModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """GPT-2 tensors from a full (TP=1, PP=1) megatron state dict; vocabulary padding dropped."""
    check_state_names(state, expected_megatron_names(model))
    h, f, n, d = model.hidden_size, model.ffn_hidden_size, model.num_attention_heads, model.head_dim
    shapes = {"self_attention.linear_qkv": (3 * h, h), "self_attention.linear_proj": (h, h),
              "mlp.linear_fc1": (f, h), "mlp.linear_fc2": (h, f)}  # fmt: skip

    def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = state[name]
        if tuple(t.shape) != shape:
            raise ConversionError(
                f"tensor {name} has shape {list(t.shape)}, the model config implies {list(shape)}"
            )
        return t

    def vocab(name: str) -> torch.Tensor:
        t = state[name]
        if t.shape[0] < model.vocab_size or tuple(t.shape[1:]) != (h,):
            raise ConversionError(
                f"tensor {name} has shape {list(t.shape)}, not [>= vocab_size "
                f"{model.vocab_size}, {h}]"
            )
        return t[: model.vocab_size]

    def linear(prefix: str, linear_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [out, in], bias [out]; zeros when the model has none)."""
        weight = tensor(f"{prefix}{linear_name}.weight", shapes[linear_name])
        if not model.add_bias_linear:
            return weight, weight.new_zeros(weight.shape[0])
        return weight, tensor(f"{prefix}{linear_name}.bias", shapes[linear_name][:1])

    def heads_first(t: torch.Tensor) -> torch.Tensor:
        """Rows ``[q_h, k_h, v_h]`` per head -> ``[q of all heads; k ...; v ...]``."""
        return t.reshape(n, 3, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    yield "transformer.wte.weight", vocab("embedding.word_embeddings.weight")
    positions = (model.max_position_embeddings, h)
    yield "transformer.wpe.weight", tensor("embedding.position_embeddings.weight", positions)
    for i in range(model.num_layers):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        for norm, ln in _NORMS.items():
            for s in ("weight", "bias"):
                yield f"{dst}{ln}.{s}", tensor(f"{src}{norm}.{s}", (h,))
        weight, bias = linear(src, "self_attention.linear_qkv")
        yield dst + "attn.c_attn.weight", heads_first(weight).t()
        yield dst + "attn.c_attn.bias", heads_first(bias)
        for megatron, gpt2 in _LINEAR.items():
            weight, bias = linear(src, megatron)
            yield f"{dst}{gpt2}.weight", weight.t()
            yield f"{dst}{gpt2}.bias", bias
    for s in ("weight", "bias"):
        yield f"transformer.ln_f.{s}", tensor(f"decoder.final_layernorm.{s}", (h,))
    if not model.tied_embeddings:
        yield "lm_head.weight", vocab("output_layer.weight")
