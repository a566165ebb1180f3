"""What a smaller model inherits: the target shape, its checks, and the kept indices.

The target architecture is the preset's (or the source's) with explicit flags on top; the
vocabulary and RoPE base are always the source's, because the inherited weights were trained with
them, and so is the norm epsilon, scaled by h/h' when hidden channels are removed (see
:class:`InheritancePlan`). Heads are kept whole (the head dimension stays the source's) and GQA
stays consistent: whole KV groups are kept, and the same number of query heads inside each kept
group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_slm.errors import ConfigError
from megatron_slm.models.args import ModelArgs, flag_text
from megatron_slm.models.presets import KIND_FIELDS, SHAPE_FIELDS, GPTModelConfig, get_preset

LAYER_METHODS = ("ends", "importance", "list")


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
    vocabulary, RoPE base and scaling and norm epsilon are the source's (part of what was
    learned)."""
    base = get_preset(model_args.model_preset) if model_args.model_preset else source
    overrides = model_args.overrides()
    if "num_layers" not in overrides and not model_args.model_preset and layers and layers.count():
        overrides["num_layers"] = layers.count()
    learned = ("rotary_base", "norm_epsilon", "rope_scaling_factor", "rope_interpolation_factor")
    for name in (*learned, *KIND_FIELDS):
        if name in overrides and overrides[name] != getattr(source, name):
            raise ConfigError(
                f"{flag_text(name, overrides[name])} differs from the source's "
                f"{flag_text(name, getattr(source, name))}: the inherited weights were trained "
                "with the source's"
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
        "init_method_std": base.init_method_std,
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
            f"inherited whole with the source's head dimension {source.head_dim}"
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
    and on a trained model the norms' outputs stay near the scale the next layers learned."""

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

    def record(self) -> dict:
        """JSON for the checkpoint metadata (per-layer entries keyed by source layer)."""
        return {
            "layers": self.layers,
            "hidden": self.hidden,
            "ffn": {str(n): v for n, v in self.ffn.items()},
            "query_groups": {str(n): v for n, v in self.groups.items()},
            "heads": {str(n): v for n, v in self.heads.items()},
            "norm_scale": self.norm_scale,
        }


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
