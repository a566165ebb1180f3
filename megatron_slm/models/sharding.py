"""Where a full (TP=1, PP=1) tensor lives in this rank's model chunks.

Used by everything that moves whole tensors in or out of sharded megatron-core chunks: Hugging Face
import, parameter inheritance, embedding remapping. megatron-core marks each tensor-parallel
parameter with ``tensor_model_parallel`` and ``partition_dim``; pipeline chunks number their layers
locally, ``layer_number`` (1-based) is global.
"""

from __future__ import annotations

import re

import torch

_LOCAL_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_LOCAL_EXPERT = re.compile(r"(mlp\.experts\.local_experts\.)(\d+)(\..+)")
# A gated linear_fc1 (a dense MLP's, an expert's or the shared expert's) holds [gate; up].
_GATED_FC1 = re.compile(
    r".*mlp\.(experts\.local_experts\.\d+\.|shared_experts\.)?linear_fc1\.(weight|bias)"
)


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def global_name(chunk, local_name: str) -> str:
    """Local parameter name of a pipeline chunk -> name in the full (PP=1) model."""
    m = _LOCAL_LAYER.fullmatch(local_name)
    if not m:
        return local_name
    layer = unwrap(chunk).decoder.layers[int(m.group(1))]
    rest = m.group(2)
    expert = _LOCAL_EXPERT.fullmatch(rest)
    if expert:  # local expert e of expert-parallel rank r: global r * (experts per rank) + e
        first = layer.mlp.local_expert_indices[0]  # (megatron-core's MoELayer)
        rest = f"{expert.group(1)}{first + int(expert.group(2))}{expert.group(3)}"
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


def tp_shard(
    name: str, full: torch.Tensor, param: torch.Tensor, tp: int, rank: int, gated: bool = True
):
    """This TP rank's slice of the full tensor for ``param`` (megatron's partition attributes).

    A ``gated`` (SwiGLU) ``linear_fc1`` holds ``[gate; up]``, and its shard is ``[gate_r; up_r]``
    (not one block); an ungated one (GeLU) is sharded as one block."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if full.shape[dim] % tp:
        raise ValueError(
            f"tensor {name}: dimension {dim} of size {full.shape[dim]} is not divisible by "
            f"tensor-parallel size {tp}"
        )
    if gated and _GATED_FC1.fullmatch(name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])
    return full.chunk(tp, dim=dim)[rank]


def tp_all_gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate the TP ranks' shards of ``t`` along ``dim`` (identity at TP=1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def tp_unshard_param(name: str, param: torch.Tensor, gated: bool = True) -> torch.Tensor:
    """The full tensor of this TP rank's (non-expert) parameter ``param``, the inverse of
    :func:`tp_shard` (collective over the TP group)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    data = param.detach()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return data
    if gated and _GATED_FC1.fullmatch(name):
        gate, up = data.chunk(2, dim=0)  # this rank's [gate_r; up_r]
        return torch.cat([tp_all_gather(gate, 0), tp_all_gather(up, 0)])
    return tp_all_gather(data, param.partition_dim)


def full_state_dict(chunk) -> dict[str, torch.Tensor]:
    """Parameters of a TP=1/PP=1 chunk (no ``_extra_state``)."""
    return {k: v for k, v in unwrap(chunk).state_dict().items() if not k.endswith("_extra_state")}
