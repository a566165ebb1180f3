"""Full tensors of a sharded model, and the slicing of one full tensor by an inheritance plan.

Megatron layout facts used here (see ``megatron_slm.convert.hf``): ``linear_qkv`` rows (and the
rows of its bias, Qwen2's) are group-interleaved ``[q heads of group g, k_g, v_g]`` per KV group;
``linear_fc1`` is ``[gate; up]`` and its TP shard is ``[gate_r; up_r]``; RMSNorm weights are
either their own tensors (``input_layernorm``, ``pre_mlp_layernorm``: torch/local specs) or fused
into the next linear as ``layer_norm_weight`` (te spec); QK norm weights (``q_layernorm``,
``k_layernorm``, Qwen3's) have one entry per channel of a head. A model with tied embeddings has
no ``output_layer.weight`` at PP=1; at PP>1 its last stage holds a copy of the embedding under
that name. Any other tensor is refused rather than copied unsliced.
"""

from __future__ import annotations

import re

import torch

from megatron_slm.models.sharding import global_name, tp_unshard_param, unwrap
from megatron_slm.tinylm.inheritance_plan import InheritancePlan

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_HIDDEN_VECTORS = (
    "input_layernorm.weight",
    "pre_mlp_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight",
    "mlp.linear_fc1.layer_norm_weight",
)
_HEAD_VECTORS = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")


def local_full_tensors(lm):
    """``(global name, full tensor)`` for every parameter of this rank's chunks, one at a time, so
    the caller slices or reduces each before the next is gathered (bounded memory at 7B).
    Collective over the TP group: every TP rank must iterate the same way."""
    for chunk in map(unwrap, lm.chunks):
        for local_name, param in chunk.named_parameters():
            name = global_name(chunk, local_name)
            yield name, tp_unshard_param(name, param)


def slice_tensor(
    name: str, full: torch.Tensor, plan: InheritancePlan
) -> tuple[str, torch.Tensor] | None:
    """The target model's ``(name, tensor)`` for one full source tensor, or None when its layer is
    dropped. Hidden-channel vectors of the norms are multiplied by ``plan.norm_scale``, and with
    QK norm the query and key rows by ``plan.qk_scale`` (why: see :class:`InheritancePlan`)."""
    src = plan.source
    hid = torch.tensor(plan.hidden, dtype=torch.long, device=full.device)
    if name == "output_layer.weight" and src.tied_embeddings:
        return None  # the last stage's copy of the embedding: the target ties to its own
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return name, full[:, hid].clone()
    if name == "decoder.final_layernorm.weight":
        return name, (full[hid] * plan.norm_scale).to(full.dtype)
    m = _LAYER.fullmatch(name)
    if not m:
        raise ValueError(f"cannot inherit tensor {name}: no slicing rule for it")
    n, suffix = int(m.group(1)), m.group(2)
    if n not in plan.layers:
        return None
    new = f"decoder.layers.{plan.layers.index(n)}.{suffix}"
    if suffix in _HIDDEN_VECTORS:
        return new, (full[hid] * plan.norm_scale).to(full.dtype)
    if suffix in _HEAD_VECTORS:  # per channel of a head: heads are kept whole (see qk_scale)
        return new, full.clone()
    d, h = src.head_dim, src.hidden_size
    ng, r = src.num_query_groups, src.num_attention_heads // src.num_query_groups
    groups, heads = plan.groups[n], plan.heads[n]
    if suffix == "self_attention.linear_qkv.weight":
        return new, _qkv_rows(full, plan, n).reshape(-1, h)[:, hid].clone()
    if suffix == "self_attention.linear_qkv.bias":
        return new, _qkv_rows(full, plan, n).reshape(-1).clone()
    if suffix == "self_attention.linear_proj.weight":
        cols = full.reshape(h, ng, r, d)
        kept = [cols[:, g, heads[i]] for i, g in enumerate(groups)]  # [h, r', d] each
        return new, torch.cat(kept, dim=1).reshape(h, -1)[hid].clone()
    neurons = torch.tensor(plan.ffn[n], dtype=torch.long, device=full.device)
    f = src.ffn_hidden_size
    if suffix == "mlp.linear_fc1.weight":
        return new, torch.cat([full[:f][neurons], full[f:][neurons]])[:, hid].clone()
    if suffix == "mlp.linear_fc2.weight":
        return new, full[hid][:, neurons].clone()
    raise ValueError(f"cannot inherit tensor {name}: no slicing rule for it")


def _qkv_rows(full: torch.Tensor, plan: InheritancePlan, n: int) -> torch.Tensor:
    """The kept ``[q heads, k, v]`` row blocks of source layer ``n``'s ``linear_qkv`` weight
    (``[rows, h]``) or bias (``[rows]``), in the target's group-interleaved order, shaped
    ``[blocks, head_dim, ...]``; query and key rows are multiplied by ``plan.qk_scale``."""
    src = plan.source
    ng, r = src.num_query_groups, src.num_attention_heads // src.num_query_groups
    blocks = full.reshape(ng, r + 2, src.head_dim, *full.shape[1:])
    heads = plan.heads[n]
    rows = torch.cat([blocks[g, heads[i] + [r, r + 1]] for i, g in enumerate(plan.groups[n])])
    if plan.qk_scale == 1.0:
        return rows
    per_group = len(heads[0]) + 2  # q heads kept in each group, k, v
    scale = torch.full((len(rows),), plan.qk_scale, dtype=rows.dtype, device=rows.device)
    scale[per_group - 1 :: per_group] = 1.0  # v has no norm after it
    return rows * scale.reshape(-1, *[1] * (rows.dim() - 1))


def megatron_shapes(arch, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Every full (TP=1, PP=1) parameter of ``arch`` in the torch/local specs, with its shape."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    shapes = {
        "embedding.word_embeddings.weight": (padded_vocab, h),
        "decoder.final_layernorm.weight": (h,),
    }
    if not arch.tied_embeddings:  # tied: the output layer reads the embedding
        shapes["output_layer.weight"] = (padded_vocab, h)
    for n in range(arch.num_layers):
        p = f"decoder.layers.{n}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attention.linear_qkv.weight": (q + 2 * kv, h),
                p + "self_attention.linear_proj.weight": (h, q),
                p + "pre_mlp_layernorm.weight": (h,),
                p + "mlp.linear_fc1.weight": (2 * f, h),
                p + "mlp.linear_fc2.weight": (h, f),
            }
        )
        if arch.add_qkv_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = (q + 2 * kv,)
        if arch.qk_layernorm:
            shapes.update({p + suffix: (d,) for suffix in _HEAD_VECTORS})
    return shapes


def check_plan_shapes(plan: InheritancePlan, padded_vocab: int) -> None:
    """Slice meta tensors of the source's shapes by ``plan`` and compare with the target's: the
    slicing rules are checked at any size (7B included) without allocating a weight."""
    expected = megatron_shapes(plan.target, padded_vocab)
    got = {}
    for name, shape in megatron_shapes(plan.source, padded_vocab).items():
        out = slice_tensor(name, torch.empty(shape, device="meta"), plan)
        if out is not None:
            got[out[0]] = tuple(out[1].shape)
    if got != expected:
        bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise ValueError(
            f"inheritance would not produce the target's tensors: {bad[0]} is "
            f"{got.get(bad[0])}, the target needs {expected.get(bad[0])}"
        )
