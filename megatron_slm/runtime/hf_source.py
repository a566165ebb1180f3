"""Read a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Nemotron / GPT-2 directory as a
megatron-core GPT model: the config mapping, lazy weight access, and the HF -> megatron tensor
mapping (full tensors, then this rank's TP shard; GPT-2's own mapping is
``runtime.hf_gpt2_source``).

It sits under the runtime so that ``runtime.plan_load`` can run a HF directory as it runs a
checkpoint (converted in memory, nothing written); ``megatron_slm.convert`` builds its import and
export on the same mapping (see ``convert/hf.py`` for the two layout changes it implements).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from functools import partial

import torch

from megatron_slm.errors import ConfigError, UserError
from megatron_slm.models.presets import GPTModelConfig, LongRope, Yarn, yarn_mscale
from megatron_slm.models.sharding import global_name, tp_shard, unwrap
from megatron_slm.runtime.hf_moe import (
    GLM4_MOE,
    MIXTRAL,
    MOE_ARCHITECTURES,
    QWEN2_MOE,
    QWEN3_MOE,
    megatron_moe_tensor,
    moe_choices,
    moe_hf_shapes,
    moe_weights,
)
from megatron_slm.runtime.hf_phi3 import PHI3_ARCHITECTURE, Phi3Weights

logger = logging.getLogger("megatron_slm")

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                           "NemotronForCausalLM": "nemotron",
                           PHI3_ARCHITECTURE: "phi3", **MOE_ARCHITECTURES}  # fmt: skip
"""Llama's layout of tensors (``convert.hf_target`` writes these too); Nemotron's with LayerNorm
1p, squared ReLU (one up projection) and a partial RoPE; Phi-3's with fused projections
(``runtime.hf_phi3``), a sliding window and a partial RoPE; Mixtral's, Qwen2-MoE's and
Qwen3-MoE's with mixtures of SwiGLU experts (``runtime.hf_moe``)."""
NEMOTRON = "NemotronForCausalLM"
GPT2_ARCHITECTURE = "GPT2LMHeadModel"
READABLE_ARCHITECTURES = (*SUPPORTED_ARCHITECTURES, GPT2_ARCHITECTURE)
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
# Tensors some checkpoints carry that hold no weights (recomputed RoPE buffers).
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class ConversionError(UserError):
    """Bad input to a conversion: the message names the file or tensor at fault."""


# ---------------------------------------------------------------------------------------------
# HF config <-> GPTModelConfig
# ---------------------------------------------------------------------------------------------
def read_hf_config(path: str) -> dict:
    """``<path>/config.json`` as a dict, with the architecture checked."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ConversionError(f"--load {path}: no such directory")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{cfg_path}: not found (not a Hugging Face model directory)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{cfg_path}: cannot read: {exc}") from exc
    architecture(cfg, cfg_path)
    return cfg


def architecture(hf_config: dict, where: str = "config.json") -> str:
    archs = hf_config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in READABLE_ARCHITECTURES:
        raise ConversionError(
            f"{where}: unsupported architecture {archs or hf_config.get('model_type')!r}; "
            f"supported: {', '.join(READABLE_ARCHITECTURES)}"
        )
    return archs[0]


def hf_tied(hf_config: dict) -> bool:
    """``tie_word_embeddings``, with its default for the architecture (GPT-2's: tied)."""
    tied_by_default = architecture(hf_config) == GPT2_ARCHITECTURE
    return bool(hf_config.get("tie_word_embeddings", tied_by_default))


def _reads_gpt2(model: GPTModelConfig) -> bool:
    """Whether ``model`` (from :func:`gpt_config_from_hf`) reads GPT-2's tensors: GPT-2 is the
    one readable architecture with learned positions."""
    return model.position_embedding_type == "learned_absolute"


# megatron-core's Llama 3 RoPE scaling has these fixed (Llama 3.1, 3.2 and 3.3 use them).
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip


def _rope(cfg: dict, where: str):
    """(RoPE base, Llama 3 scaling factor or None, linear interpolation factor or None, the
    LongRoPE parameters or None, the YaRN parameters or None) from a transformers 4
    (``rope_theta`` / ``rope_scaling``) or 5 (``rope_parameters``) config; other scaled RoPE
    variants, and Llama 3 scaling with other constants than megatron-core's, are refused."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    factor, linear, longrope, yarn = None, None, None, None
    for d in (params, scaling):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind == "llama3":
            for key, value in LLAMA3_ROPE.items():
                if float(d.get(key, -1)) != value:
                    raise ConversionError(
                        f"{where}: llama3 RoPE scaling with {key} {d.get(key)!r} is not "
                        f"supported (megatron-core's is {value:g})"
                    )
            factor = float(d["factor"])
        elif kind == "linear":  # positions / factor: megatron-core's seq_len_interpolation_factor
            linear = float(d["factor"])
        elif kind in ("longrope", "su") and architecture(cfg, where) == PHI3_ARCHITECTURE:
            longrope = d  # ("su": its name in the first Phi-3 configs)
        elif kind == "yarn":
            yarn = _yarn(cfg, d, where)
        elif kind not in ("default", None):
            raise ConversionError(
                f"{where}: RoPE scaling {kind!r} is not supported (plain RoPE, linear, Llama 3's "
                "and YaRN; LongRoPE with Phi3ForCausalLM)"
            )
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    return theta, factor, linear, _longrope(cfg, longrope, where) if longrope else None, yarn


def _yarn(cfg: dict, d: dict, where: str) -> Yarn:
    """transformers 5's YaRN parameters: the original length from the config's own
    ``original_max_position_embeddings`` (Phi-3's place), else the RoPE parameters', else
    ``max_position_embeddings``; a missing ``factor`` is the ratio of ``max_position_embeddings``
    to it (DeepSeek's rule); the attention factor as given, else from ``mscale`` over
    ``mscale_all_dim`` where both are, else ``0.1 ln(factor) + 1``."""
    key = "original_max_position_embeddings"
    original = cfg.get(key) or d.get(key) or cfg["max_position_embeddings"]
    factor = d.get("factor") or cfg["max_position_embeddings"] / original
    attention = d.get("attention_factor")
    if attention is None:
        mscale, all_dim = d.get("mscale"), d.get("mscale_all_dim")
        attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dim)
                     if mscale and all_dim else yarn_mscale(factor))  # fmt: skip
    try:
        return Yarn(
            factor=float(factor),
            original_max_positions=int(original),
            attention_factor=float(attention),
            beta_fast=float(d.get("beta_fast") or 32),
            beta_slow=float(d.get("beta_slow") or 1),
            truncate=bool(d.get("truncate", True)),
        )
    except ConfigError as e:
        raise ConversionError(f"{where}: {e}") from None


def _longrope(cfg: dict, d: dict, where: str) -> LongRope:
    """transformers' LongRoPE parameters: the attention factor as given, else from ``factor``,
    else from the ratio of ``max_position_embeddings`` to the original length (Phi-3's rule)."""
    try:
        original = int(d.get("original_max_position_embeddings")
                       or cfg["original_max_position_embeddings"])  # fmt: skip
        short, long = d["short_factor"], d["long_factor"]
    except KeyError as e:
        raise ConversionError(f"{where}: LongRoPE without {e.args[0]}") from None
    attention = d.get("attention_factor")
    if attention is None:  # transformers 5 prefers a given factor to the length ratio
        factor = d.get("factor") or cfg["max_position_embeddings"] / original
        attention = LongRope.derived_attention_factor(factor, original)
    try:
        return LongRope(short, long, original, float(attention))
    except UserError as e:
        raise ConversionError(f"{where}: {e}") from None


def gpt_config_from_hf(cfg: dict, where: str = "config.json") -> GPTModelConfig:
    """The megatron_slm architecture of a HF config (unsupported features refused)."""
    arch = architecture(cfg, where)
    if arch == GPT2_ARCHITECTURE:
        from megatron_slm.runtime.hf_gpt2_source import gpt_config_from_gpt2

        return gpt_config_from_gpt2(cfg, where)
    act = "relu2" if arch == NEMOTRON else "silu"
    if cfg.get("hidden_act", act) != act:
        raise ConversionError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported ({act})")
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if cfg.get(flag) and not (arch == GLM4_MOE and flag == "attention_bias"):  # (GLM's QKV)
            raise ConversionError(f"{where}: {flag}=true is not supported")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    window = (
        cfg.get("sliding_window")
        if arch in ("MistralForCausalLM", PHI3_ARCHITECTURE, MIXTRAL)
        else None
    )
    if arch in (QWEN2_MOE, QWEN3_MOE) and cfg.get("use_qk_norm") is False:
        raise ConversionError(f"{where}: use_qk_norm=false is not supported")
    if arch == MIXTRAL and cfg.get("router_jitter_noise"):
        raise ConversionError(
            f"{where}: router_jitter_noise {cfg['router_jitter_noise']} is not supported (0)"
        )
    if window is not None and window < 2:
        raise ConversionError(f"{where}: sliding_window {window} is not supported (>= 2)")
    if window is not None and window >= cfg.get("max_position_embeddings", 0):
        window = None  # wider than any sequence: full causal attention
    theta, rope_scaling_factor, interpolation, longrope, yarn = _rope(cfg, where)
    try:
        return GPTModelConfig(
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=cfg.get("num_key_value_heads") or heads,
            kv_channels=head_dim,  # Qwen3-0.6B's heads do not split its width
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg["max_position_embeddings"],
            rotary_base=theta,
            rope_scaling_factor=rope_scaling_factor,
            rope_interpolation_factor=interpolation,
            longrope=longrope,
            yarn=yarn,
            norm_epsilon=float(
                cfg.get("norm_eps", 1e-5) if arch == NEMOTRON else cfg.get("rms_norm_eps", 1e-6)
            ),
            init_method_std=float(cfg.get("initializer_range", 0.02)),
            # Qwen2's q, k and v projections have biases (Qwen2-MoE's unless qkv_bias is false)
            add_qkv_bias=arch == "Qwen2ForCausalLM"
            or (arch == QWEN2_MOE and cfg.get("qkv_bias", True))
            or (arch == GLM4_MOE and bool(cfg.get("attention_bias"))),
            # Qwen3 normalises each head's query and key (GLM-4.5 where use_qk_norm)
            qk_layernorm=arch in ("Qwen3ForCausalLM", QWEN3_MOE)
            or (arch == GLM4_MOE and bool(cfg.get("use_qk_norm"))),
            # Mistral's W: the token itself and the W - 1 before it (Megatron-LM's (W - 1, 0))
            window_size=None if window is None else window - 1,
            **(_nemotron_choices(cfg) if arch == NEMOTRON else {}),
            **({"rotary_percent": _rotary_share(cfg, 1.0)} if arch == PHI3_ARCHITECTURE else {}),
            **({"rotary_percent": _rotary_share(cfg, 0.5)} if arch == GLM4_MOE else {}),
            **(moe_choices(cfg, arch) if arch in MOE_ARCHITECTURES else {}),
        )
    except ConfigError as e:  # a value the model config refuses: named with the file
        raise ConversionError(f"{where}: {e}") from None


def _rotary_share(cfg: dict, default: float) -> float:
    """RoPE's share of each head from a transformers 4 (``partial_rotary_factor``) or 5
    (``rope_parameters``) config."""
    params = cfg.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", default)))


def _nemotron_choices(cfg: dict) -> dict:
    """Nemotron's architecture choices; its RoPE's share of each head from a transformers 4
    (``partial_rotary_factor``) or 5 (``rope_parameters``) config."""
    return {"normalization": "LayerNorm", "activation": "squared_relu",
            "apply_layernorm_1p": True, "rotary_percent": _rotary_share(cfg, 0.5)}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# HF weight files
# ---------------------------------------------------------------------------------------------
class HFWeights:
    """Lazy access to the tensors of a HF model directory (safetensors or ``.bin``, sharded with an
    index json or single-file). Missing files and tensors raise :class:`ConversionError` naming
    them."""

    def __init__(self, path: str):
        self.path = path
        found = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise ConversionError(
                f"{path}: no weight file found (looked for {', '.join(WEIGHT_FILES)})"
            )
        main = found[0]
        self._files: dict[str, str] = {}  # tensor name -> file name
        self._bin_cache: dict[str, dict] = {}  # the one .bin file loaded (mmap)
        if main.endswith(".index.json"):
            index_path = os.path.join(path, main)
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise ConversionError(f"{index_path}: cannot read weight_map: {exc}") from exc
            for name, file in weight_map.items():
                if not os.path.isfile(os.path.join(path, file)):
                    raise ConversionError(
                        f"{os.path.join(path, file)}: weight file not found (listed in "
                        f"{main} for tensor {name})"
                    )
            self._files = dict(weight_map)
        else:
            for name in self._open(main).keys():
                self._files[name] = main

    def _open(self, file: str):
        full = os.path.join(self.path, file)
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                return safe_open(full, framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own types
                raise ConversionError(f"{full}: cannot read safetensors file: {exc}") from exc
        if file not in self._bin_cache:
            try:
                self._bin_cache = {
                    file: torch.load(full, map_location="cpu", weights_only=True, mmap=True)
                }
            except Exception as exc:  # noqa: BLE001
                raise ConversionError(f"{full}: cannot read PyTorch weight file: {exc}") from exc
        return _DictReader(self._bin_cache[file])

    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def _file_of(self, name: str) -> str:
        if name not in self._files:
            raise ConversionError(f"{self.path}: tensor {name} not found in the weight files")
        return self._files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._file_of(name)
        reader = self._open(file)
        if file.endswith(".safetensors"):
            return tuple(reader.get_slice(name).get_shape())
        return tuple(reader.get_tensor(name).shape)

    def get(self, name: str) -> torch.Tensor:
        return self._open(self._file_of(name)).get_tensor(name)

    def location(self, name: str) -> str:
        return os.path.join(self.path, self._file_of(name))


class _DictReader:
    def __init__(self, state: dict):
        self._state = state

    def keys(self):
        return self._state.keys()

    def get_tensor(self, name):
        return self._state[name]


def open_hf_weights(path: str, hf_config: dict, model: GPTModelConfig):
    """The directory's tensors under Llama's names (Phi-3's fused ones split: ``hf_phi3``;
    Mixtral's and GLM-4.5's mixtures under Qwen-MoE's: ``hf_moe``)."""
    weights = HFWeights(path)
    if architecture(hf_config) in MOE_ARCHITECTURES:
        return moe_weights(weights, architecture(hf_config), model.num_layers)
    if architecture(hf_config) != PHI3_ARCHITECTURE:
        return weights
    d = model.head_dim
    return Phi3Weights(weights, model.num_attention_heads * d, model.num_query_groups * d)


# ---------------------------------------------------------------------------------------------
# name / layout mapping (full, unsharded tensors)
# ---------------------------------------------------------------------------------------------
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_LAYER_MAP = {  # megatron suffix -> HF suffix (one-to-one tensors)
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_NORM_BIASES = {  # LayerNorm's (Nemotron's)
    "input_layernorm.bias": "input_layernorm.bias",
    "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
}


# Qwen's attention extras: megatron suffix -> HF suffix.
_QKV_BIAS = ("self_attention.linear_qkv.bias",)  # <- q_proj/k_proj/v_proj.bias, interleaved
_QK_NORMS = {"self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
             "self_attention.k_layernorm.weight": "self_attn.k_norm.weight"}  # fmt: skip


def expected_hf_shapes(model: GPTModelConfig, tied: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of ``model`` has, with its shape."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    shapes = {"model.embed_tokens.weight": (model.vocab_size, h)}
    norm_params = ("weight", "bias") if model.normalization == "LayerNorm" else ("weight",)
    shapes.update({f"model.norm.{s}": (h,) for s in norm_params})
    if not tied:
        shapes["lm_head.weight"] = (model.vocab_size, h)
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
            }
        )
        if model.moe_layers[i]:
            shapes.update(moe_hf_shapes(model, p))
        else:
            shapes.update({p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)})
            if model.gated:
                shapes[p + "mlp.gate_proj.weight"] = (f, h)
        shapes.update({f"{p}{norm}.{s}": (h,) for s in norm_params
                       for norm in ("input_layernorm", "post_attention_layernorm")})  # fmt: skip
        if model.add_qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})  # fmt: skip
        if model.qk_layernorm:
            shapes.update({p + theirs: (d,) for theirs in _QK_NORMS.values()})
    return shapes


def _ignored_llama_tensor(name: str, tied: bool) -> bool:
    """RoPE buffers, and a tied model's copy of the embedding as ``lm_head.weight``."""
    return bool(_IGNORED_HF.fullmatch(name)) or (tied and name == "lm_head.weight")


def check_hf_weights(model: GPTModelConfig, weights: HFWeights, tied: bool = False) -> None:
    """Every expected tensor present with the shape config.json implies; nothing unexpected."""
    if _reads_gpt2(model):
        from megatron_slm.runtime import hf_gpt2_source as gpt2

        expected = gpt2.expected_gpt2_shapes(model, gpt2.gpt2_prefix(weights))
        ignored = partial(gpt2.ignored_gpt2_tensor, tied=tied)
    else:
        expected = expected_hf_shapes(model, tied)
        ignored = partial(_ignored_llama_tensor, tied=tied)
    for name, shape in expected.items():
        if name not in weights:
            if name == "lm_head.weight":
                raise ConversionError(
                    f"{weights.path}: tensor lm_head.weight not found and tie_word_embeddings "
                    "is false"
                )
            name = getattr(weights, "source_name", str)(name)  # (its own name: Mixtral's)
            raise ConversionError(f"{weights.path}: tensor {name} not found in the weight files")
        actual = weights.shape(name)
        if actual != shape:
            raise ConversionError(
                f"tensor {name} in {weights.location(name)} has shape {list(actual)}, "
                f"config.json implies {list(shape)}"
            )
    extra = [n for n in weights.names() if n not in expected and not ignored(n)]
    if extra:
        raise ConversionError(
            f"{weights.path}: unsupported tensors (not part of the model config.json "
            f"describes): {', '.join(sorted(extra)[:8])}" + (" ..." if len(extra) > 8 else "")
        )


def _pad_vocab(name: str, tensor: torch.Tensor, padded: int) -> torch.Tensor:
    if tensor.shape[0] > padded:
        raise ConversionError(
            f"tensor {name}: vocabulary of {tensor.shape[0]} rows is larger than the padded "
            f"vocabulary size {padded} of the model"
        )
    if tensor.shape[0] == padded:
        return tensor
    pad = tensor.new_zeros((padded - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad])


def megatron_tensor_from_hf(
    name: str,
    model: GPTModelConfig,
    weights: HFWeights,
    padded_vocab: int,
    tied: bool = False,
) -> torch.Tensor:
    """The full (TP=1) megatron tensor ``name`` (global layer numbering) from HF weights."""
    if _reads_gpt2(model):
        from megatron_slm.runtime import hf_gpt2_source as gpt2

        prefix = gpt2.gpt2_prefix(weights)
        pad = lambda src, tensor: _pad_vocab(src, tensor, padded_vocab)  # noqa: E731
        return gpt2.megatron_tensor_from_gpt2(name, model, weights, prefix, pad)
    if name == "embedding.word_embeddings.weight":
        return _pad_vocab(
            "model.embed_tokens.weight", weights.get("model.embed_tokens.weight"), padded_vocab
        )
    if name == "output_layer.weight":
        src = "model.embed_tokens.weight" if tied else "lm_head.weight"
        return _pad_vocab(src, weights.get(src), padded_vocab)
    if name in ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias"):
        return weights.get("model.norm." + name.rsplit(".", 1)[1])
    m = _LAYER.fullmatch(name)
    if not m:
        raise ConversionError(f"megatron parameter {name} has no Hugging Face counterpart")
    layer, suffix = int(m.group(1)), m.group(2)
    p = f"model.layers.{layer}."
    if suffix in _LAYER_MAP or suffix in _NORM_BIASES:
        return weights.get(p + {**_LAYER_MAP, **_NORM_BIASES}[suffix])
    if suffix == "self_attention.linear_qkv.weight":
        ng, h, d = model.num_query_groups, model.hidden_size, model.head_dim
        r = model.num_attention_heads // ng
        q = weights.get(p + "self_attn.q_proj.weight").reshape(ng, r * d, h)
        k = weights.get(p + "self_attn.k_proj.weight").reshape(ng, d, h)
        v = weights.get(p + "self_attn.v_proj.weight").reshape(ng, d, h)
        return torch.cat([q, k, v], dim=1).reshape(ng * (r + 2) * d, h)
    if suffix in _QK_NORMS:
        return weights.get(p + _QK_NORMS[suffix])
    if suffix == "self_attention.linear_qkv.bias":
        ng, d = model.num_query_groups, model.head_dim
        r = model.num_attention_heads // ng
        q = weights.get(p + "self_attn.q_proj.bias").reshape(ng, r * d)
        k = weights.get(p + "self_attn.k_proj.bias").reshape(ng, d)
        v = weights.get(p + "self_attn.v_proj.bias").reshape(ng, d)
        return torch.cat([q, k, v], dim=1).reshape(-1)
    moe = megatron_moe_tensor(suffix, p, weights)
    if moe is not None:
        return moe
    if suffix == "mlp.linear_fc1.weight" and not model.gated:  # one up projection
        return weights.get(p + "mlp.up_proj.weight")
    if suffix == "mlp.linear_fc1.weight":
        gate = weights.get(p + "mlp.gate_proj.weight")
        up = weights.get(p + "mlp.up_proj.weight")
        return torch.cat([gate, up], dim=0)
    raise ConversionError(f"megatron parameter {name} has no Hugging Face counterpart")


# ---------------------------------------------------------------------------------------------
# megatron model chunks (any TP/PP)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def load_hf_into_chunks(chunks, weights: HFWeights, model: GPTModelConfig, tied: bool = False):
    """Copy HF weights into this rank's model chunks (built for the current TP/PP layout)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in map(unwrap, chunks):
        # (and the routers' expert biases: buffers, saved with the weights)
        biases = ((n, b) for n, b in chunk.named_buffers() if n.endswith("router.expert_bias"))
        for local, param in itertools.chain(chunk.named_parameters(), biases):
            name = global_name(chunk, local)
            padded = None
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                padded = param.shape[0] * (tp if getattr(param, "tensor_model_parallel", 0) else 1)
            full = megatron_tensor_from_hf(name, model, weights, padded or 0, tied)
            try:
                shard = tp_shard(name, full, param, tp, rank, model.gated)
            except ValueError as e:
                raise ConversionError(str(e)) from None
            if tuple(shard.shape) != tuple(param.shape):
                raise ConversionError(
                    f"tensor {name}: shard of shape {list(shard.shape)} does not fit megatron "
                    f"parameter {local} of shape {list(param.shape)}"
                )
            param.copy_(shard)


def tokenizer_files(path: str) -> list[str]:
    """The tokenizer's files in the directory ``path``, its code included (see
    :func:`tokenizer_code_files`): what a copy of the tokenizer needs."""
    data = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
    return data + tokenizer_code_files(path)


def tokenizer_code_files(path: str) -> list[str]:
    """The Python files of a tokenizer that is code its directory ships: the modules its
    ``tokenizer_config.json`` names in ``auto_map`` (``"tokenization_x.XTokenizer"``) and what
    they import relatively (transformers' rule), in that order; [] for any other tokenizer. A
    module of another repository (``"repo--module.Class"``) is not a file of this one."""
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            auto_map = json.load(f).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):  # none, or not a JSON object: no code
        return []
    refs = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
    refs = refs if isinstance(refs, list) else [refs]
    modules = [r.rsplit(".", 1)[0] for r in refs if isinstance(r, str) and "--" not in r]
    files: list[str] = []
    for module in dict.fromkeys(modules):
        main = os.path.join(path, module.replace(".", os.sep) + ".py")
        if not os.path.isfile(main):
            continue  # (transformers says so when it loads the tokenizer)
        from transformers.dynamic_module_utils import get_relative_import_files

        for full in [main, *get_relative_import_files(main)]:
            name = os.path.relpath(full, path)
            if os.path.isfile(full) and name not in files:
                files.append(name)
    return files
