"""What a smaller model inherits: the target shape, its checks, and the kept indices.

The source is Llama's architecture or one of its Qwen variants (:func:`check_source`). The target
architecture is the preset's (or the source's) with explicit flags on top; the vocabulary, RoPE
base and the architecture's kind (QKV biases, tied embeddings, QK norm) are always the source's,
because the inherited weights were trained with them, and so is the norm epsilon, scaled by h/h'
when hidden channels are removed (see :class:`InheritancePlan`). Heads are kept whole (the head
dimension stays the source's, ``kv_channels`` included) and GQA stays consistent: whole KV groups
are kept, and the same number of query heads inside each kept group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_slm.errors import ConfigError
from megatron_slm.models.args import ModelArgs, flag_text
from megatron_slm.models.presets import KIND_FIELDS, SHAPE_FIELDS, GPTModelConfig, get_preset

LAYER_METHODS = ("ends", "importance", "list")
INHERITABLE_KIND = {"normalization": "RMSNorm", "activation": "swiglu",
                    "position_embedding_type": "rope", "add_bias_linear": False,
                    "apply_layernorm_1p": False, "rotary_percent": 1.0,
                    "num_experts": None}  # fmt: skip
"""The kind fields the slicing rules rest on (Llama's): RMSNorm has no mean to recentre over the
removed channels, ``linear_fc1`` is SwiGLU's ``[gate; up]``, no bias is added to the residual
stream, and RoPE turns whole heads. The other kind fields are free: QKV biases (Qwen2's) are
sliced with the QKV rows, tied embeddings (Qwen2.5-0.5B, Llama 3.2 1B) are the embedding alone,
and QK norm (Qwen3's) acts inside a head, which is kept whole; so is a head size that does not
split the width (``kv_channels``)."""


def check_source(source: GPTModelConfig, load: str) -> None:
    """Refuse a source the slicing rules were not written for, in one line naming ``--load``."""
    if any(getattr(source, name) != value for name, value in INHERITABLE_KIND.items()):
        raise ConfigError(
            f"--load {load}: parameter inheritance takes Llama's architecture (RMSNorm, SwiGLU, "
            "RoPE on whole heads, no linear biases, plain norm weights, a dense MLP), also "
            "with Qwen's QKV "
            "biases, QK norm, tied embeddings or a head size that does not split the width; the "
            f"checkpoint's is {source.describe_kind()}"
        )


@dataclass(frozen=True)
class LayerChoice:
    """``--layers``: ``ends:A,B`` | ``importance`` | ``0,1,5,...`` (source layer indices)."""

    method: str
    first: int = 0
    last: int = 0
    indices: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> LayerChoice | None:
        if text is None:
            return None
        text = text.strip()
        if text == "importance":
            return cls("importance")
        try:
            if text.startswith("ends:"):
                a, b = (int(x) for x in text[5:].split(","))
                if a < 0 or b < 0:
                    raise ValueError
                return cls("ends", a, b)
            indices = tuple(int(x) for x in text.split(","))
        except ValueError:
            raise ConfigError(
                f"--layers {text!r}: expected ends:A,B, importance, or a comma-separated list of "
                "source layer indices"
            ) from None
        if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
            raise ConfigError(f"--layers {text!r}: indices must be distinct and >= 0")
        return cls("list", indices=tuple(sorted(indices)))

    def count(self) -> int | None:
        if self.method == "ends":
            return self.first + self.last
        return len(self.indices) if self.method == "list" else None


def target_architecture(
    source: GPTModelConfig, model_args: ModelArgs, layers: LayerChoice | None = None
) -> GPTModelConfig:
    """The architecture to build: ``--model-preset`` (else the source's) with explicit flags on
    top; ``--layers ends:A,B`` or a list sets the depth when no flag or preset does. The
    vocabulary, RoPE base and scaling, norm epsilon and kind are the source's (part of what was
    learned), and so is the head size where it does not split the source's width (Qwen3's
    ``kv_channels``): heads are kept whole. ``--kv-channels`` may confirm the source's head size,
    so that a target whose heads do not split its width can be cut from a Llama."""
    base = get_preset(model_args.model_preset) if model_args.model_preset else source
    overrides = model_args.overrides()
    if "num_layers" not in overrides and not model_args.model_preset and layers and layers.count():
        overrides["num_layers"] = layers.count()
    learned = ("rotary_base", "norm_epsilon", "rope_scaling_factor", "rope_interpolation_factor",
               "window_size", "longrope")  # fmt: skip
    for name in (*learned, *KIND_FIELDS):
        if name in overrides and overrides[name] != getattr(source, name):
            raise ConfigError(
                f"{flag_text(name, overrides[name])} differs from the source's "
                f"{flag_text(name, getattr(source, name))}: the inherited weights were trained "
                "with the source's"
            )
    if model_args.kv_channels is not None and model_args.kv_channels != source.head_dim:
        raise ConfigError(
            f"--kv-channels {model_args.kv_channels} differs from the source's head size "
            f"{source.head_dim}: heads are inherited whole"
        )
    fields = {
        "num_layers": base.num_layers,
        "hidden_size": base.hidden_size,
        "ffn_hidden_size": base.ffn_hidden_size,
        "num_attention_heads": base.num_attention_heads,
        "num_query_groups": base.num_query_groups,
        "max_position_embeddings": base.max_position_embeddings,
        **overrides,
        "vocab_size": source.vocab_size,
        "rotary_base": source.rotary_base,
        "rope_scaling_factor": source.rope_scaling_factor,
        "rope_interpolation_factor": source.rope_interpolation_factor,
        "window_size": source.window_size,  # (how the inherited heads learned to attend)
        "longrope": source.longrope,
        "init_method_std": base.init_method_std,
        # None (hidden / heads) unless the source's heads, or --kv-channels, say otherwise.
        "kv_channels": model_args.kv_channels or source.kv_channels,
        **source.kind,
    }
    # RMSNorm over the kept h' channels equals RMSNorm over all h with the dropped ones at zero
    # when the weights are scaled by sqrt(h/h') (InheritancePlan.norm_scale) and eps by h/h'.
    fields["norm_epsilon"] = source.norm_epsilon * source.hidden_size / fields["hidden_size"]
    # GPTModelConfig refuses heads not divisible by groups or hidden by heads, naming the flag.
    return GPTModelConfig(**fields)


def check_target(source: GPTModelConfig, target: GPTModelConfig) -> None:
    """Refuse a target the source cannot be cut down to (errors name the flag and both values)."""
    for name in SHAPE_FIELDS:
        mine, theirs = getattr(target, name), getattr(source, name)
        if mine > theirs:
            raise ConfigError(
                f"--{name.replace('_', '-')} {mine} is larger than the source's {theirs}: "
                "inheritance only removes layers, channels, neurons and heads"
            )
    if target.head_dim != source.head_dim:
        raise ConfigError(
            f"--hidden-size {target.hidden_size} / --num-attention-heads "
            f"{target.num_attention_heads} gives head dimension {target.head_dim}, but heads are "
            f"inherited whole with the source's head dimension {source.head_dim} (give "
            f"--kv-channels {source.head_dim} for heads that do not split the width)"
        )
    r_src = source.num_attention_heads // source.num_query_groups
    r_tgt = target.num_attention_heads // target.num_query_groups
    if r_tgt > r_src:
        raise ConfigError(
            f"--num-attention-heads {target.num_attention_heads} / --num-query-groups "
            f"{target.num_query_groups} = {r_tgt} query heads per KV group, more than the "
            f"source's {r_src}: GQA groups are kept whole, with heads taken from inside each"
        )


def check_layers(choice: LayerChoice | None, source: GPTModelConfig, target: GPTModelConfig):
    """``--layers`` against the two depths (before any work)."""
    if choice is None:
        if target.num_layers != source.num_layers:
            raise ConfigError(
                f"the target has {target.num_layers} layers, the source {source.num_layers}: "
                "choose which to keep with --layers ends:A,B, importance, or a list"
            )
        return
    count = choice.count()
    if count is not None and count != target.num_layers:
        raise ConfigError(
            f"--layers keeps {count} layers, but the target has --num-layers {target.num_layers}"
        )
    if choice.method == "list" and choice.indices[-1] >= source.num_layers:
        raise ConfigError(
            f"--layers: layer {choice.indices[-1]} does not exist (the source has "
            f"{source.num_layers}, numbered from 0)"
        )


def chosen_layers(
    choice: LayerChoice | None, source: GPTModelConfig, n: int, block_importance=None
) -> list[int]:
    """Source layer indices to keep, ascending."""
    if choice is None:
        return list(range(source.num_layers))
    if choice.method == "ends":
        return list(range(choice.first)) + list(
            range(source.num_layers - choice.last, source.num_layers)
        )
    if choice.method == "list":
        return list(choice.indices)
    return top_k(block_importance, n)


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, ascending (ties to the lower index)."""
    order = torch.sort(-torch.as_tensor(scores, dtype=torch.float64), stable=True).indices
    return sorted(order[:k].tolist())


@dataclass
class InheritancePlan:
    """Kept source indices, per component (per source layer for the per-layer ones).

    ``norm_scale``: RMSNorm divides by ``sqrt(mean(x^2) + eps)`` over all ``h`` channels. With
    the kept norm weights multiplied by ``sqrt(h / h')`` and the target's epsilon by ``h / h'``,
    RMSNorm over the kept ``h'`` channels computes exactly what the source's computes when the
    dropped channels are zero: the pruned model is exact when the pruned parts contribute nothing,
    and on a trained model the norms' outputs stay near the scale the next layers learned.

    ``qk_scale``: QK norm (Qwen3's) normalises each head's query and key over the head size, which
    width pruning leaves alone, so its weights are copied unchanged; but megatron-core gives it the
    model's epsilon, which the target multiplies by ``h / h'``. RMSNorm is scale-invariant up to
    its epsilon (``RMSNorm_{c^2 eps}(c x) = RMSNorm_eps(x)``), so the query and key rows of
    ``linear_qkv`` (weights and biases) are multiplied by ``c = norm_scale`` instead."""

    source: GPTModelConfig
    target: GPTModelConfig
    layers: list[int]
    hidden: list[int]
    ffn: dict[int, list[int]]
    groups: dict[int, list[int]]
    heads: dict[int, list[list[int]]]  # per kept group: kept query heads inside the group

    @property
    def norm_scale(self) -> float:
        return math.sqrt(self.source.hidden_size / self.target.hidden_size)

    @property
    def qk_scale(self) -> float:
        return self.norm_scale if self.source.qk_layernorm else 1.0

    def record(self) -> dict:
        """JSON for the checkpoint metadata (per-layer entries keyed by source layer)."""
        record = {
            "layers": self.layers,
            "hidden": self.hidden,
            "ffn": {str(n): v for n, v in self.ffn.items()},
            "query_groups": {str(n): v for n, v in self.groups.items()},
            "heads": {str(n): v for n, v in self.heads.items()},
            "norm_scale": self.norm_scale,
        }
        if self.source.qk_layernorm:  # (absent otherwise: Llama's records are unchanged)
            record["qk_scale"] = self.qk_scale
        return record


def make_plan(source: GPTModelConfig, target: GPTModelConfig, layers: list[int], imp):
    """Keep the most important channels / neurons / groups / heads (``imp``: importance.Importance;
    its entries may be missing for components that are not pruned)."""
    h, f = target.hidden_size, target.ffn_hidden_size
    ng_src = source.num_query_groups
    r_src = source.num_attention_heads // ng_src
    ng, r = target.num_query_groups, target.num_attention_heads // target.num_query_groups
    keep_all = source.hidden_size == h
    hidden = list(range(h)) if keep_all else top_k(imp.hidden, h)
    ffn, groups, heads = {}, {}, {}
    for n in layers:
        ffn[n] = list(range(f)) if f == source.ffn_hidden_size else top_k(imp.ffn[n], f)
        if ng == ng_src and r == r_src:
            groups[n] = list(range(ng))
            heads[n] = [list(range(r)) for _ in range(ng)]
            continue
        scores = imp.heads[n].reshape(ng_src, r_src)
        groups[n] = top_k(scores.sum(1), ng)
        heads[n] = [top_k(scores[g], r) for g in groups[n]]
    return InheritancePlan(source, target, layers, hidden, ffn, groups, heads)


def prunes_width(source: GPTModelConfig, target: GPTModelConfig) -> bool:
    return any(
        getattr(source, k) != getattr(target, k)
        for k in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
    )
