"""Importance of a trained model's parts, for choosing what a smaller model inherits (Minitron).

* **Activation** (calibration data): hidden channels from the outputs of every RMSNorm (the two per
  layer and the final one), FFN neurons from the input of ``linear_fc2``, attention heads from the
  input of ``linear_proj``. Each location aggregates Minitron's way: mean ``|activation|`` over the
  sequence, then L2 over the batch; hidden channels sum the locations. A head's score is the L2
  norm of its ``head_dim`` channels.
* **Depth** (calibration data): block importance = mean over tokens of
  ``1 - cos(block input, block output)``: a layer that hardly changes the residual stream matters
  least (ShortGPT / Minitron).
* **Magnitude** (weights only): per channel / neuron / head, the summed L2 norms of the weight rows
  and columns that read or write it (matrices only: norm weights and Qwen2's QKV biases add
  nothing; a tied embedding counts once).
* **Random**: seeded scores, the baseline that learned criteria must beat.

Stats are collected on this rank's modules at any TP/PP (forward hooks under
``runtime.per_token_losses``), gathered over TP and merged over all ranks, so every rank ends with
the same full-size :class:`Importance`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from megatron_slm.models.sharding import tp_all_gather, unwrap

WIDTH_METHODS = ("activation", "magnitude", "random")


@dataclass
class Importance:
    """Full-size scores (higher = keep); ``None`` where not computed."""

    hidden: torch.Tensor | None = None  # [h]
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)  # source layer -> [f]
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # source layer -> [heads]
    layers: torch.Tensor | None = None  # [num_layers] block importance
    calibration_loss: float | None = None  # the source's mean token loss on the calibration rows


# ---------------------------------------------------------------------------------------------
# collectives: TP gather of a sharded stat, merge of per-rank dicts
# ---------------------------------------------------------------------------------------------
def merge_over_ranks(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Union of every rank's ``{key: cpu tensor}`` (TP/DP replicas hold equal values)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(local)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part)
    return merged


# ---------------------------------------------------------------------------------------------
# activation and depth statistics
# ---------------------------------------------------------------------------------------------
def _mean_abs_sq(x: torch.Tensor) -> torch.Tensor:
    """``x [s, b, c]`` -> ``[c]``: sum over the batch of (mean over the sequence of |x|)^2."""
    return x.detach().float().abs().mean(0).pow(2).sum(0)


class _Stats:
    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.depth: dict[int, list[float]] = defaultdict(lambda: [0.0, 0])

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.cpu()
        self.sums[key] = self.sums[key] + value if key in self.sums else value


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def _is_identity(module) -> bool:
    from megatron.core.transformer.identity_op import IdentityOp

    return isinstance(module, IdentityOp)


def _register_hooks(lm, stats: _Stats, want_width: bool, want_depth: bool) -> list:
    handles = []
    for chunk in map(unwrap, lm.chunks):
        eps = chunk.config.layernorm_epsilon
        for layer in chunk.decoder.layers:
            n = layer.layer_number - 1
            attn, mlp = layer.self_attention, layer.mlp
            if want_width:
                # Norm outputs: separate modules (torch/local specs) or fused into the next linear
                # as layer_norm_weight (te spec): there, recompute the norm from its input.
                for where, norm, fused in (
                    ("input", layer.input_layernorm, attn.linear_qkv),
                    ("pre_mlp", layer.pre_mlp_layernorm, mlp.linear_fc1),
                ):
                    key = f"hidden.{n}.{where}"
                    if not _is_identity(norm):
                        handles.append(
                            norm.register_forward_hook(
                                lambda m, a, out, key=key: stats.add(key, _mean_abs_sq(out))
                            )
                        )
                    else:
                        handles.append(
                            fused.register_forward_pre_hook(
                                lambda m, a, key=key, eps=eps: stats.add(
                                    key, _mean_abs_sq(_rms_norm(a[0], m.layer_norm_weight, eps))
                                )
                            )
                        )
                handles.append(
                    mlp.linear_fc2.register_forward_pre_hook(
                        lambda m, a, n=n: stats.add(f"ffn.{n}", _mean_abs_sq(a[0]))
                    )
                )
                handles.append(
                    attn.linear_proj.register_forward_pre_hook(
                        lambda m, a, n=n: stats.add(f"heads.{n}", _mean_abs_sq(a[0]))
                    )
                )
            if want_depth:

                def depth_hook(module, args, kwargs, output, n=n):
                    x = kwargs.get("hidden_states", args[0] if args else None)
                    y = output[0] if isinstance(output, tuple) else output
                    cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
                    acc = stats.depth[n]
                    acc[0] += float((1 - cos).sum())
                    acc[1] += cos.numel()

                handles.append(layer.register_forward_hook(depth_hook, with_kwargs=True))
        final = getattr(chunk.decoder, "final_layernorm", None)
        if want_width and final is not None and not _is_identity(final):
            handles.append(
                final.register_forward_hook(
                    lambda m, a, out: stats.add("hidden.final", _mean_abs_sq(out))
                )
            )
    return handles


@torch.no_grad()
def calibration_statistics(lm, batches: list, *, width: bool, depth: bool) -> Importance:
    """Run the calibration ``batches`` (``runtime.forward.Rows``) through the loaded model with
    hooks; returns activation (``width``) and block (``depth``) importance, merged over ranks,
    and the source's mean calibration loss. Collective over all ranks."""
    from megatron_slm.runtime import per_token_losses

    stats = _Stats()
    handles = _register_hooks(lm, stats, width, depth)
    try:
        losses = per_token_losses(lm, batches)
    finally:
        for h in handles:
            h.remove()
    local: dict[str, torch.Tensor] = {}
    for key, acc in stats.sums.items():
        # fc2 / proj inputs are TP-sharded along the last dim; norm outputs are whole.
        full = tp_all_gather(acc, 0) if key.startswith(("ffn.", "heads.")) else acc
        local[key] = full.sqrt()  # L2 over the batch
    for n, (total, count) in stats.depth.items():
        local[f"depth.{n}"] = torch.tensor([total / max(count, 1)])
    if losses:
        cat = torch.cat([x.flatten() for x in losses]).double().cpu()
        local["loss"] = torch.tensor([float(cat.sum()), float(cat.numel())], dtype=torch.float64)
    return _assemble(merge_over_ranks(local), lm.arch)


def _assemble(merged: dict[str, torch.Tensor], arch) -> Importance:
    imp = Importance()
    hidden = [v for k, v in merged.items() if k.startswith("hidden.")]
    if hidden:
        imp.hidden = torch.stack(hidden).sum(0)
    d = arch.head_dim
    for key, value in merged.items():
        kind, _, rest = key.partition(".")
        if kind == "ffn":
            imp.ffn[int(rest)] = value
        elif kind == "heads":
            imp.heads[int(rest)] = value.reshape(-1, d).norm(dim=1)
    depth = {int(k.split(".")[1]): float(v[0]) for k, v in merged.items() if k.startswith("depth.")}
    if depth:
        imp.layers = torch.tensor([depth[n] for n in range(arch.num_layers)])
    if "loss" in merged:
        total, count = merged["loss"].tolist()
        imp.calibration_loss = total / max(count, 1)
    return imp


# ---------------------------------------------------------------------------------------------
# weight magnitude and random
# ---------------------------------------------------------------------------------------------
def magnitude_contributions(name: str, full: torch.Tensor, arch) -> dict[str, torch.Tensor]:
    """Per-channel weight norms of one full (TP-gathered) tensor, keyed like the activation stats
    (``hidden.<tensor>``, ``ffn.<layer>.<part>``, ``heads.<layer>.<part>``)."""
    w = full.float()
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    ng, r = arch.num_query_groups, arch.num_attention_heads // arch.num_query_groups
    out: dict[str, torch.Tensor] = {}
    if name == "output_layer.weight" and arch.tied_embeddings:
        return out  # the last stage's copy of the embedding (PP>1): counted once, at any PP
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        out[f"hidden.{name}"] = w.norm(dim=0)
        return out
    parts = name.split(".")
    if parts[:2] != ["decoder", "layers"] or not name.endswith(".weight") or w.dim() != 2:
        return out  # norms carry no magnitude signal of their own
    n, suffix = int(parts[2]), ".".join(parts[3:])
    if suffix == "self_attention.linear_qkv.weight":
        out[f"hidden.{name}"] = w.norm(dim=0)
        q = w.reshape(ng, r + 2, d, h)[:, :r]  # [groups, heads per group, d, h]
        out[f"heads.{n}.q"] = q.reshape(ng * r, d * h).norm(dim=1)
    elif suffix == "self_attention.linear_proj.weight":
        out[f"hidden.{name}"] = w.norm(dim=1)
        out[f"heads.{n}.o"] = w.t().reshape(ng * r, d * h).norm(dim=1)
    elif suffix == "mlp.linear_fc1.weight":
        out[f"hidden.{name}"] = w.norm(dim=0)
        out[f"ffn.{n}.fc1"] = w[:f].norm(dim=1) + w[f:].norm(dim=1)
    elif suffix == "mlp.linear_fc2.weight":
        out[f"hidden.{name}"] = w.norm(dim=1)
        out[f"ffn.{n}.fc2"] = w.norm(dim=0)
    return out


def magnitude_importance(named_full_tensors, arch) -> Importance:
    """Magnitude importance from ``(global name, full tensor)`` pairs of this rank, merged over
    ranks. Collective over all ranks."""
    local: dict[str, torch.Tensor] = {}
    for name, full in named_full_tensors:
        local.update({k: v.cpu() for k, v in magnitude_contributions(name, full, arch).items()})
    merged = merge_over_ranks(local)
    imp = Importance()
    hidden = [v for k, v in merged.items() if k.startswith("hidden.")]
    imp.hidden = torch.stack(hidden).sum(0) if hidden else None
    for key, value in merged.items():
        kind, _, rest = key.partition(".")
        if kind in ("ffn", "heads"):
            n = int(rest.split(".")[0])
            target = imp.ffn if kind == "ffn" else imp.heads
            target[n] = target[n] + value if n in target else value
    return imp


def random_importance(arch, seed: int) -> Importance:
    """Seeded random scores (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    imp = Importance(hidden=torch.rand(arch.hidden_size, generator=g))
    for n in range(arch.num_layers):
        imp.ffn[n] = torch.rand(arch.ffn_hidden_size, generator=g)
        imp.heads[n] = torch.rand(arch.num_attention_heads, generator=g)
    return imp
