"""Upcycling: a mixture of experts started from a trained dense model (Megatron-LM's
``--moe-use-upcycling``; Komatsuzaki et al., "Sparse Upcycling", and He et al., "Upcycling Large
Language Models into Mixture of Experts", arXiv 2410.07524, for the granular form).

Every tensor of the dense model is copied, except each mixture layer's MLP: its ``E`` experts are
built from the dense MLP of width ``F``. With granularity ``G`` (``--moe-upcycling-granularity``)
each expert has width ``F / G``: expert ``j`` is the ``(j mod G)``-th slice of the dense neurons
(``[gate_g; up_g]`` rows of ``linear_fc1``, columns of ``linear_fc2``), so the ``E / G`` groups
of ``G`` consecutive experts are ``E / G`` copies of the whole MLP. The router's row ``j`` is row
``j // G`` of a fresh initialisation, so a group's experts score alike. Both MLP matrices are
scaled by ``a ** (1/3)`` (gated or squared-ReLU MLPs; else ``a ** (1/2)``) for the activation scale
``a`` = ``G`` (or ``E G / k`` with --moe-router-pre-softmax) that makes up for the weights of the
chosen experts: megatron-core's ``upcycling_utils`` rules, which the tests compare against.

At ``G = 1`` every expert is the dense MLP (scale 1), so wherever the chosen experts' weights sum
to 1 (softmax over the top k, megatron-core's default, or sigmoid scores with k > 1, without
--moe-router-topk-scaling-factor) the upcycled model computes what the dense one did.

Unlike megatron-core's converter, which works on each rank's shards, this one slices the full
(TP-gathered) dense tensors and draws the router from ``--seed`` alone, so the upcycled model is
the same at any TP, PP and expert parallelism; dense layers that --moe-layer-freq keeps are
copied.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from megatron_slm.errors import ConfigError
from megatron_slm.models.args import MOE_ARCHITECTURE_FLAGS, ModelArgs
from megatron_slm.models.presets import GPTModelConfig, moe_layer_pattern
from megatron_slm.models.sharding import global_name, tp_shard, tp_unshard_param, unwrap

_EXPERT = re.compile(
    r"decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight"
)
_ROUTER = re.compile(r"decoder\.layers\.(\d+)\.mlp\.router\.weight")
MIXTURE_FIELDS = ("num_experts", *MOE_ARCHITECTURE_FLAGS)
# The dense layer's pre-MLP norm: its own module (torch/local specs) or fused into linear_fc1
# (Transformer Engine's spec), where a mixture layer always has its own.
_FUSED_NORM = {
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


def upcycled_architecture(
    dense: GPTModelConfig, model_args: ModelArgs, granularity: int, where: str
) -> GPTModelConfig:
    """The mixture that ``dense`` (the checkpoint ``where``) upcycles into: its architecture with
    the mixture flags of ``model_args`` and experts ``granularity`` times narrower than its MLP
    (the other flags confirm the checkpoint: :func:`dense_flags`)."""
    if dense.mixture:
        raise ConfigError(
            f"--moe-use-upcycling: {where} is a mixture of experts already; upcycling starts one "
            "from a dense model"
        )
    experts = model_args.num_experts
    if experts is None:
        raise ConfigError("--moe-use-upcycling needs --num-experts")
    if experts % granularity:
        raise ConfigError(
            f"--num-experts {experts} must be a multiple of --moe-upcycling-granularity "
            f"{granularity} (each copy of the dense MLP is cut in {granularity} experts)"
        )
    f = dense.ffn_hidden_size
    if f % granularity:
        raise ConfigError(
            f"--moe-upcycling-granularity {granularity} does not divide the dense MLP width {f} "
            f"of {where}"
        )
    width = f // granularity
    if model_args.moe_ffn_hidden_size not in (None, width):
        raise ConfigError(
            f"--moe-ffn-hidden-size {model_args.moe_ffn_hidden_size}: upcycling {where} (MLP "
            f"width {f}) at granularity {granularity} makes experts of width {width}"
        )
    if model_args.moe_shared_expert_intermediate_size:
        raise ConfigError(
            "--moe-shared-expert-intermediate-size: upcycling builds the routed experts from the "
            "dense MLP; a shared expert would start untrained (leave it out)"
        )
    mixture = {name: value for name, value in model_args.overrides().items()
               if name in MIXTURE_FIELDS}  # fmt: skip
    mixture["moe_ffn_hidden_size"] = width if granularity > 1 else None
    if "moe_layer_freq" in mixture:
        mixture["moe_layer_freq"] = moe_layer_pattern(mixture["moe_layer_freq"], dense.num_layers)
    return dataclasses.replace(dense, **mixture)


def dense_flags(model_args: ModelArgs, dense: GPTModelConfig, granularity: int) -> ModelArgs:
    """``model_args`` without the mixture's flags: what must describe the dense checkpoint.
    Megatron-LM's scripts give the experts' width as --ffn-hidden-size: that reading is taken
    too."""
    fields = dataclasses.fields(ModelArgs)
    cleared = {f.name: f.default for f in fields if f.name in MIXTURE_FIELDS}
    if model_args.ffn_hidden_size == dense.ffn_hidden_size // granularity:
        cleared["ffn_hidden_size"] = None
    return dataclasses.replace(model_args, **cleared)


def weight_scale(moe: GPTModelConfig, granularity: int) -> float:
    """megatron-core's scale of both MLP matrices of an upcycled expert (see the module doc)."""
    experts, topk = moe.num_experts, moe.moe_router_topk
    if moe.moe_router_pre_softmax:
        activation_scale = (experts // granularity) * granularity * granularity / topk
    else:
        activation_scale = granularity
    cubic = moe.gated or moe.activation == "squared_relu"
    return activation_scale ** (1 / 3) if cubic else activation_scale ** (1 / 2)


def initial_router(seed: int, layer: int, moe: GPTModelConfig) -> torch.Tensor:
    """The fresh router ``[E, h]`` that layer ``layer`` (global, 0-based) is upcycled from: normal
    with the model's init std, from ``seed`` and the layer alone (the same at any layout)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.empty(moe.num_experts, moe.hidden_size).normal_(
        0, moe.init_method_std, generator=g
    )


def upcycled_router(initial: torch.Tensor, granularity: int) -> torch.Tensor:
    """Row ``j`` is row ``j // G`` of ``initial`` (megatron-core's: its first ``E / G`` rows,
    each repeated ``G`` times), so the ``G`` slices of one copy of the MLP score alike."""
    rows = initial.shape[0] // granularity
    return initial[:rows].repeat_interleave(granularity, dim=0)


def expert_tensor(
    kind: str, dense_full: torch.Tensor, expert: int, granularity: int, scale: float, gated: bool
) -> torch.Tensor:
    """The full ``linear_fc1`` / ``linear_fc2`` weight of global expert ``expert`` from the dense
    layer's full one (``[gate; up]`` rows of width F, or ``[h, F]``)."""
    g = expert % granularity
    if kind == "linear_fc2":
        return dense_full.tensor_split(granularity, dim=1)[g] * scale
    if gated:
        gate, up = dense_full.chunk(2, dim=0)
        return (
            torch.cat([gate.tensor_split(granularity)[g], up.tensor_split(granularity)[g]]) * scale
        )
    return dense_full.tensor_split(granularity)[g] * scale


@torch.no_grad()
def upcycle_chunks(dense_chunks, moe_chunks, moe: GPTModelConfig, granularity: int, seed: int):
    """Fill this rank's mixture chunks from its dense chunks (both built at this layout, the
    dense ones loaded). Collective over the TP group (the dense MLPs are gathered)."""
    for dense_chunk, moe_chunk in zip(map(unwrap, dense_chunks), map(unwrap, moe_chunks)):
        _upcycle_chunk(dense_chunk, moe_chunk, moe, granularity, seed)


def _upcycle_chunk(dense_chunk, moe_chunk, moe: GPTModelConfig, granularity: int, seed: int):
    from megatron.core import parallel_state

    etp = parallel_state.get_expert_tensor_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    scale = weight_scale(moe, granularity)
    dense = dict(dense_chunk.named_parameters())
    gathered = {}  # local name of a dense MLP matrix -> its full tensor, gathered once
    for local, param in moe_chunk.named_parameters():
        name = global_name(moe_chunk, local)
        expert = _EXPERT.fullmatch(name)
        if expert is not None:
            kind = expert.group(3)
            source = f"{local[: local.index('.mlp.')]}.mlp.{kind}.weight"
            if source not in gathered:
                gathered[source] = tp_unshard_param(
                    global_name(dense_chunk, source), dense[source], moe.gated
                )
            full = expert_tensor(
                kind, gathered[source], int(expert.group(2)), granularity, scale, moe.gated
            )
            param.copy_(tp_shard(name, full, param, etp, etp_rank, moe.gated))
        elif (router := _ROUTER.fullmatch(name)) is not None:
            initial = initial_router(seed, int(router.group(1)), moe)
            param.copy_(upcycled_router(initial, granularity))
        elif local in dense:
            param.copy_(dense[local])
        else:  # a mixture layer's own pre-MLP norm, fused into the dense linear_fc1
            suffix = next((k for k in _FUSED_NORM if local.endswith(k)), None)
            source = suffix and local[: -len(suffix)] + _FUSED_NORM[suffix]
            if source not in dense:
                raise ValueError(f"upcycling: no dense tensor for {name}")
            param.copy_(dense[source])
