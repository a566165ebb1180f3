"""Hugging Face Llama / Mistral <-> megatron-core GPT checkpoints.

Both architectures are the one megatron_slm builds (RMSNorm, SwiGLU, RoPE rotate-half, grouped-query
attention, no biases), so conversion is a renaming plus two layout changes:

* ``linear_qkv`` is group-interleaved: for each key/value group ``g`` the rows are
  ``[q heads of g (heads/groups x head_dim), k_g (head_dim), v_g (head_dim)]``; HF keeps
  ``q_proj`` / ``k_proj`` / ``v_proj`` separate, heads in order. Because the groups are contiguous,
  a TP shard of ``linear_qkv`` is a contiguous row block of the full tensor.
* ``linear_fc1`` is ``[gate; up]``; a TP shard holds ``[gate_r; up_r]`` (not a contiguous block).

Both use the non-interleaved RoPE (``rotate_half``), the same inverse frequencies and softmax scale,
so no head permutation is needed (checked by the parity tests against ``transformers``).

Vocabulary: megatron pads the embedding and output layer to a multiple of
``--make-vocab-size-divisible-by`` x TP; the padding rows are zero after import and dropped on
export.

Import (:func:`convert_hf_to_megatron`) runs either in one process (any target TP/PP: the
distributed checkpoint is layout-free, only the padded vocabulary depends on the target TP and is
computed for it) or under ``torchrun`` with TP x PP processes (each rank fills its own shards).
Export (:func:`convert_megatron_to_hf`) runs in one process: megatron-core reshards the checkpoint
to TP=1/PP=1 on load, so every tensor is whole.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_slm.convert.tokenizer_export import (
    set_chat_template,
    write_generation_config,
    write_sentencepiece_hf_tokenizer,
)
from megatron_slm.models.presets import GPTModelConfig, padded_vocab_size
from megatron_slm.models.sharding import full_state_dict, global_name, tp_shard, unwrap

logger = logging.getLogger("megatron_slm")

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ConversionError(ValueError):
    """Bad input to a conversion: the message names the file or tensor at fault."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


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
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{where}: unsupported architecture {archs or hf_config.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return archs[0]


def _rope_theta(cfg: dict, where: str) -> float:
    """RoPE base from a transformers 4 (``rope_theta``/``rope_scaling``) or 5
    (``rope_parameters``) config; scaled RoPE variants are refused."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for d in (params, scaling):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in ("default", None):
            raise ConversionError(
                f"{where}: RoPE scaling {kind!r} is not supported (only plain RoPE)"
            )
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def gpt_config_from_hf(cfg: dict, where: str = "config.json") -> GPTModelConfig:
    """The megatron_slm architecture of a HF Llama/Mistral config (unsupported features refused)."""
    arch = architecture(cfg, where)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConversionError(f"{where}: {flag}=true is not supported (no biases)")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
        raise ConversionError(
            f"{where}: head_dim {head_dim} x num_attention_heads {heads} != hidden_size "
            f"{cfg['hidden_size']} is not supported"
        )
    window = cfg.get("sliding_window") if arch == "MistralForCausalLM" else None
    if window is not None and window < cfg.get("max_position_embeddings", 0):
        logger.warning(
            "%s: sliding_window %d is converted to full causal attention (exact for sequences "
            "up to %d tokens)",
            where,
            window,
            window,
        )
    return GPTModelConfig(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"],
        rotary_base=_rope_theta(cfg, where),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        init_method_std=float(cfg.get("initializer_range", 0.02)),
    )


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
    source = source or {}
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
        "rope_scaling": None,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "initializer_range": model.init_method_std,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype_name(dtype),
        "bos_token_id": source.get("bos_token_id", 1),
        "eos_token_id": source.get("eos_token_id", 2),
    }
    if source.get("pad_token_id") is not None:
        cfg["pad_token_id"] = source["pad_token_id"]
    if arch == "LlamaForCausalLM":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        cfg["sliding_window"] = source.get("sliding_window")
    return cfg


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


def expected_hf_shapes(model: GPTModelConfig, tied: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of ``model`` has, with its shape."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    shapes = {"model.embed_tokens.weight": (model.vocab_size, h), "model.norm.weight": (h,)}
    if not tied:
        shapes["lm_head.weight"] = (model.vocab_size, h)
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    return shapes


def check_hf_weights(model: GPTModelConfig, weights: HFWeights, tied: bool = False) -> None:
    """Every expected tensor present with the shape config.json implies; nothing unexpected."""
    expected = expected_hf_shapes(model, tied)
    for name, shape in expected.items():
        if name not in weights:
            if name == "lm_head.weight":
                raise ConversionError(
                    f"{weights.path}: tensor lm_head.weight not found and tie_word_embeddings "
                    "is false"
                )
            raise ConversionError(f"{weights.path}: tensor {name} not found in the weight files")
        actual = weights.shape(name)
        if actual != shape:
            raise ConversionError(
                f"tensor {name} in {weights.location(name)} has shape {list(actual)}, "
                f"config.json implies {list(shape)}"
            )
    extra = [
        n
        for n in weights.names()
        if n not in expected
        and not _IGNORED_HF.fullmatch(n)
        and not (tied and n == "lm_head.weight")
    ]
    if extra:
        raise ConversionError(
            f"{weights.path}: unsupported tensors (not part of a Llama/Mistral model without "
            f"biases): {', '.join(sorted(extra)[:8])}" + (" ..." if len(extra) > 8 else "")
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
    if name == "embedding.word_embeddings.weight":
        return _pad_vocab(
            "model.embed_tokens.weight", weights.get("model.embed_tokens.weight"), padded_vocab
        )
    if name == "output_layer.weight":
        src = "model.embed_tokens.weight" if tied else "lm_head.weight"
        return _pad_vocab(src, weights.get(src), padded_vocab)
    if name == "decoder.final_layernorm.weight":
        return weights.get("model.norm.weight")
    m = _LAYER.fullmatch(name)
    if not m:
        raise ConversionError(f"megatron parameter {name} has no Hugging Face counterpart")
    layer, suffix = int(m.group(1)), m.group(2)
    p = f"model.layers.{layer}."
    if suffix in _LAYER_MAP:
        return weights.get(p + _LAYER_MAP[suffix])
    if suffix == "self_attention.linear_qkv.weight":
        ng, h, d = model.num_query_groups, model.hidden_size, model.head_dim
        r = model.num_attention_heads // ng
        q = weights.get(p + "self_attn.q_proj.weight").reshape(ng, r * d, h)
        k = weights.get(p + "self_attn.k_proj.weight").reshape(ng, d, h)
        v = weights.get(p + "self_attn.v_proj.weight").reshape(ng, d, h)
        return torch.cat([q, k, v], dim=1).reshape(ng * (r + 2) * d, h)
    if suffix == "mlp.linear_fc1.weight":
        gate = weights.get(p + "mlp.gate_proj.weight")
        up = weights.get(p + "mlp.up_proj.weight")
        return torch.cat([gate, up], dim=0)
    raise ConversionError(f"megatron parameter {name} has no Hugging Face counterpart")


def hf_tensors_from_megatron(
    state: dict[str, torch.Tensor], model: GPTModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors from a full (TP=1, PP=1) megatron state dict; vocabulary padding dropped."""
    expected = {
        "embedding.word_embeddings.weight",
        "output_layer.weight",
        "decoder.final_layernorm.weight",
    }
    for i in range(model.num_layers):
        expected.update(
            f"decoder.layers.{i}.{s}"
            for s in (*_LAYER_MAP, "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight")
        )
    missing = sorted(expected - set(state))
    if missing:
        raise ConversionError(f"checkpoint lacks tensors: {', '.join(missing[:8])}")
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ConversionError(f"checkpoint has unsupported tensors: {', '.join(unexpected[:8])}")

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
    for i in range(model.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "self_attention.linear_qkv.weight"]
        if qkv.shape != (ng * (r + 2) * d, h):
            raise ConversionError(
                f"tensor {src}self_attention.linear_qkv.weight has shape {list(qkv.shape)}, "
                f"the model config implies {[ng * (r + 2) * d, h]}"
            )
        q, k, v = qkv.reshape(ng, (r + 2) * d, h).split([r * d, d, d], dim=1)
        fc1 = state[src + "mlp.linear_fc1.weight"]
        if fc1.shape != (2 * f, h):
            raise ConversionError(
                f"tensor {src}mlp.linear_fc1.weight has shape {list(fc1.shape)}, "
                f"the model config implies {[2 * f, h]}"
            )
        yield dst + "input_layernorm.weight", state[src + "input_layernorm.weight"]
        yield dst + "self_attn.q_proj.weight", q.reshape(ng * r * d, h)
        yield dst + "self_attn.k_proj.weight", k.reshape(ng * d, h)
        yield dst + "self_attn.v_proj.weight", v.reshape(ng * d, h)
        yield dst + "self_attn.o_proj.weight", state[src + "self_attention.linear_proj.weight"]
        yield dst + "post_attention_layernorm.weight", state[src + "pre_mlp_layernorm.weight"]
        yield dst + "mlp.gate_proj.weight", fc1[:f]
        yield dst + "mlp.up_proj.weight", fc1[f:]
        yield dst + "mlp.down_proj.weight", state[src + "mlp.linear_fc2.weight"]
    yield "model.norm.weight", state["decoder.final_layernorm.weight"]
    yield "lm_head.weight", vocab("output_layer.weight")


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
        for local, param in chunk.named_parameters():
            name = global_name(chunk, local)
            padded = None
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                padded = param.shape[0] * (tp if getattr(param, "tensor_model_parallel", 0) else 1)
            full = megatron_tensor_from_hf(name, model, weights, padded or 0, tied)
            try:
                shard = tp_shard(name, full, param, tp, rank)
            except ValueError as e:
                raise ConversionError(str(e)) from None
            if tuple(shard.shape) != tuple(param.shape):
                raise ConversionError(
                    f"tensor {name}: shard of shape {list(shard.shape)} does not fit megatron "
                    f"parameter {local} of shape {list(param.shape)}"
                )
            param.copy_(shard)


# ---------------------------------------------------------------------------------------------
# tokenizer files
# ---------------------------------------------------------------------------------------------
def tokenizer_files(path: str) -> list[str]:
    return [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]


def copy_tokenizer(src: str, dst: str) -> list[str]:
    files = tokenizer_files(src)
    os.makedirs(dst, exist_ok=True)
    for f in files:
        shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    return files


def tokenizer_vocab_size(path: str) -> int:
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(path, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise ConversionError(f"{path}: cannot load the Hugging Face tokenizer: {exc}") from exc


def check_tokenizer_vocab(tok_path: str, n_tokens: int, model: GPTModelConfig, padded: int):
    if n_tokens > padded:
        raise ConversionError(
            f"tokenizer {tok_path}: vocabulary of {n_tokens} tokens is larger than the padded "
            f"vocabulary size {padded} of model.embed_tokens.weight"
        )
    if n_tokens > model.vocab_size:
        logger.warning(
            "tokenizer %s has %d tokens, more than vocab_size %d: ids >= %d use zero padding rows",
            tok_path,
            n_tokens,
            model.vocab_size,
            model.vocab_size,
        )


# ---------------------------------------------------------------------------------------------
# the two directions
# ---------------------------------------------------------------------------------------------
@dataclass
class ImportResult:
    checkpoint: str
    model: GPTModelConfig
    padded_vocab_size: int


def import_layout(tensor_model_parallel_size: int, pipeline_model_parallel_size: int):
    """The (TP, PP) an import builds its model at: (1, 1) in a world of one process, else the
    target layout itself (one process per shard)."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    world = world_size()
    if world == 1:
        return 1, 1
    if world == tp * pp:
        return tp, pp
    raise ConversionError(
        f"conversion runs in 1 process or in --tensor-model-parallel-size x "
        f"--pipeline-model-parallel-size = {tp * pp} processes, not {world}"
    )


def world_size() -> int:
    import torch.distributed as dist

    from megatron_slm.launch import process_info

    return dist.get_world_size() if dist.is_initialized() else process_info().world_size


def convert_hf_to_megatron(
    load: str,
    save: str,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    make_vocab_size_divisible_by: int = 128,
    params_dtype: str | torch.dtype = torch.float32,
    iteration: int = 0,
) -> ImportResult:
    """HF Llama/Mistral directory -> megatron_slm checkpoint at ``save`` for the target TP/PP.

    In a world of one process the model is built at TP=1/PP=1 with the target's padded
    vocabulary; in a world of TP x PP processes (torchrun) at the target layout itself. The caller
    (the entry point) initialises that layout: :func:`import_layout`.
    """
    import torch.distributed as dist

    from megatron_slm.checkpoint import save_checkpoint
    from megatron_slm.models import ModelBuildOptions, build_model

    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    load = os.path.abspath(load)
    hf_cfg = read_hf_config(load)
    where = os.path.join(load, "config.json")
    model = gpt_config_from_hf(hf_cfg, where)
    tied = bool(hf_cfg.get("tie_word_embeddings", False))
    weights = HFWeights(load)
    check_hf_weights(model, weights, tied)
    padded = padded_vocab_size(model.vocab_size, make_vocab_size_divisible_by, tp)
    tok_files = tokenizer_files(load)
    n_tokens = tokenizer_vocab_size(load) if tok_files else None
    if n_tokens is not None:
        check_tokenizer_vocab(load, n_tokens, model, padded)
    else:
        logger.warning("%s: no tokenizer files; the checkpoint records no tokenizer", load)
    from megatron_slm.models import check_parallel_layout

    check_parallel_layout(model, tp, pp)

    build_tp, build_pp = import_layout(tp, pp)
    divisible = padded if build_tp == 1 else make_vocab_size_divisible_by
    from megatron.core import parallel_state

    if (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    ) != (build_tp, build_pp):
        raise ConversionError(
            f"initialise the parallel state with TP={build_tp}, PP={build_pp} first "
            "(megatron_slm.convert.hf.import_layout)"
        )
    dtype = parse_dtype(params_dtype)
    opts = ModelBuildOptions(
        transformer_impl="torch", params_dtype=dtype, make_vocab_size_divisible_by=divisible
    )
    chunks = build_model(model, opts)
    load_hf_into_chunks(chunks, weights, model, tied)

    save = os.path.abspath(save)
    tok_dir = os.path.join(save, "tokenizer")
    if tok_files and dist.get_rank() == 0:
        copy_tokenizer(load, tok_dir)
    metadata = {
        "source": f"hf:{load}",
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "params_dtype": dtype_name(dtype),
        # The layout the padded vocabulary was computed for (built at TP=1 in a world of one).
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "hf": {"architecture": architecture(hf_cfg), "config": hf_cfg},
    }
    if tok_files:
        metadata["tokenizer"] = {
            "type": "HuggingFaceTokenizer",
            "model": tok_dir,
            "vocab_size": n_tokens,
        }
    ckpt = save_checkpoint(save, iteration, chunks, model_config=model, metadata=metadata)
    logger.info("converted %s -> %s (padded vocabulary %d)", load, ckpt, padded)
    return ImportResult(ckpt, model, padded)


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", size.upper())
    if not m:
        raise ConversionError(f"--max-shard-size {size!r}: expected e.g. 5GB, 500MB or bytes")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def write_hf_weights(
    tensors: Iterator[tuple[str, torch.Tensor]], save: str, max_shard_size: str | int = "5GB"
) -> list[str]:
    """safetensors file(s) (+ ``model.safetensors.index.json`` when sharded); returns file names."""
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().clone()
        size += nbytes
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map, total = {}, 0
    for file, shard in zip(names, shards):
        save_file(shard, os.path.join(save, file), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = file
            total += t.numel() * t.element_size()
    if n > 1:
        with open(os.path.join(save, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def convert_megatron_to_hf(
    load: str,
    save: str,
    *,
    architecture_name: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    tokenizer_model: str | None = None,
    chat_template: str | None = None,
) -> str:
    """megatron_slm checkpoint -> HF directory (config.json, generation_config.json, safetensors,
    a fast tokenizer with a chat template; see :func:`export_tokenizer`).

    Runs in one process: the checkpoint is loaded at TP=1/PP=1 (megatron-core reshards).
    """
    from megatron.core import parallel_state

    from megatron_slm.checkpoint import checkpoint_tensor_info, read_checkpoint
    from megatron_slm.runtime import load_model

    if world_size() != 1:
        raise ConversionError("megatron-to-hf runs in a single process (no torchrun)")
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ConversionError("megatron-to-hf loads the checkpoint at TP=1/PP=1")
    info = read_checkpoint(load)
    ckpt, meta, model = info.path, info.meta, info.model
    tensor_info = checkpoint_tensor_info(ckpt)
    ckpt_dtype = next(iter(tensor_info.values()))[1] if tensor_info else torch.float32
    out_dtype = parse_dtype(dtype) if dtype is not None else ckpt_dtype
    hf_meta = meta.get("hf") or {}
    arch = architecture_name or hf_meta.get("architecture") or "LlamaForCausalLM"
    hf_cfg = hf_config_from_gpt(model, arch, out_dtype, hf_meta.get("config"))
    lm = load_model(ckpt, torch.device("cpu"), params_dtype=ckpt_dtype, with_tokenizer=False)
    state = full_state_dict(lm.chunks[0])

    os.makedirs(save, exist_ok=True)
    tensors = ((k, v.to(out_dtype)) for k, v in hf_tensors_from_megatron(state, model))
    files = write_hf_weights(tensors, save, max_shard_size)
    ids = export_tokenizer(ckpt, meta, save, tokenizer_model, chat_template)
    if ids is not None:  # the exported tokenizer's special ids win over the defaults
        hf_cfg.update({k: v for k, v in ids.items() if k != "pad_token_id" or v is not None})
    with open(os.path.join(save, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    write_generation_config(
        save,
        hf_cfg.get("bos_token_id"),
        hf_cfg.get("eos_token_id"),
        hf_cfg.get("pad_token_id"),
    )
    logger.info("exported %s -> %s (%s)", ckpt, save, ", ".join(files))
    return save


def _checkpoint_file(ckpt: str, recorded: str | None, name: str) -> str | None:
    """A recorded tokenizer path, or the copy beside a moved checkpoint (root/``name``)."""
    if recorded and os.path.exists(recorded):
        return recorded
    root = os.path.dirname(ckpt) if os.path.basename(ckpt).startswith("iter_") else ckpt
    beside = os.path.join(root, name)
    return beside if os.path.exists(beside) else None


def export_tokenizer(
    ckpt: str,
    meta: dict,
    save: str,
    tokenizer_model: str | None = None,
    chat_template: str | None = None,
) -> dict | None:
    """Write the checkpoint's tokenizer to ``save`` as a Hugging Face tokenizer with a chat
    template; return its ``{bos,eos,pad}_token_id`` (None when no tokenizer was written).

    * ``tokenizer_model`` (``--tokenizer-model``): a HF tokenizer directory or SentencePiece file
      to use instead of the recorded one;
    * a SentencePiece tokenizer becomes ``tokenizer.json`` + ``tokenizer_config.json`` +
      ``special_tokens_map.json`` (``convert.tokenizer_export``), ids equal to ours;
    * a HF tokenizer is copied as is;
    * the chat template: ``chat_template`` (``--chat-template FILE``), else the one the checkpoint
      records (``chat_template``: an SFT run's), else the HF tokenizer's own, else
      ``data.chat.DEFAULT_CHAT_TEMPLATE``, the template the trainer's SFT mode uses by default.
    """
    from megatron_slm.data.chat import DEFAULT_CHAT_TEMPLATE

    record = meta.get("tokenizer") or {}
    chosen = chat_template or meta.get("chat_template")
    src = tokenizer_model
    if src is None and record.get("type") == "HuggingFaceTokenizer":
        src = _checkpoint_file(ckpt, record.get("model"), "tokenizer")
    elif src is None and record.get("type") == "SentencePieceTokenizer":
        src = _checkpoint_file(ckpt, record.get("model"), "tokenizer.model")
        if src is None:
            raise ConversionError(
                f"--load {ckpt}: the recorded SentencePiece model {record.get('model')} is missing;"
                " give it with --tokenizer-model"
            )
    if src is None:
        logger.warning("no tokenizer recorded for %s: none written to %s", ckpt, save)
        return None
    if os.path.isfile(src):
        write_sentencepiece_hf_tokenizer(src, save, chosen or DEFAULT_CHAT_TEMPLATE)
    elif os.path.isdir(src):
        if not copy_tokenizer(src, save):
            raise ConversionError(f"--tokenizer-model {src}: holds no tokenizer files")
        if set_chat_template(save, chosen or DEFAULT_CHAT_TEMPLATE, overwrite=bool(chosen)):
            logger.info("chat template written to %s/tokenizer_config.json", save)
    else:
        raise ConversionError(f"--tokenizer-model {src}: no such file or directory")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(save, local_files_only=True)
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def load_hf_model(
    load: str,
    device: torch.device,
    *,
    tokenizer_args=None,
    params_dtype: torch.dtype = torch.float32,
    transformer_impl: str | None = None,
):
    """A Hugging Face Llama/Mistral directory converted in memory into this rank's model chunks
    (current TP layout, PP=1), as a ``megatron_slm.runtime.LoadedModel``."""
    from megatron_slm.data.tokenizer import build_tokenizer
    from megatron_slm.models import ModelBuildOptions, build_model, default_spec_impl
    from megatron_slm.runtime import LoadedModel

    hf_cfg = read_hf_config(load)
    config = gpt_config_from_hf(hf_cfg, os.path.join(load, "config.json"))
    tied = bool(hf_cfg.get("tie_word_embeddings", False))
    weights = HFWeights(load)
    check_hf_weights(config, weights, tied)
    opts = ModelBuildOptions(
        transformer_impl=transformer_impl or default_spec_impl(device),
        params_dtype=params_dtype,
        use_cpu_initialization=device.type == "cpu",
    )
    (chunk,) = build_model(config, opts)
    load_hf_into_chunks([chunk], weights, config, tied)
    chunk.to(device).eval()
    chunk.requires_grad_(False)
    if tokenizer_args is not None and tokenizer_args.tokenizer_type is not None:
        tok = build_tokenizer(
            tokenizer_args.tokenizer_type, tokenizer_args.tokenizer_model, tokenizer_args.vocab_size
        )
    else:
        tok = build_tokenizer("HuggingFaceTokenizer", load) if tokenizer_files(load) else None
    return LoadedModel(
        [chunk], config, tok, chunk.vocab_size, device, params_dtype, os.path.abspath(load)
    )
