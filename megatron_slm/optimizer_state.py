"""The optimizer's part of a checkpoint.

The plain optimizer's state is per parameter: it resumes at any TP/PP/DP. The distributed
optimizer's has two formats, Megatron-LM's names:

* ``dp_reshardable`` (the default, as in Megatron-LM): per gradient bucket, every rank writes its
  own shard, no communication. It resumes at any DP with the same TP, PP, virtual stages and
  buckets (``training.optimizer.check_optimizer_resume`` says so before any work).
* ``fully_reshardable`` (``--dist-ckpt-optim-fully-reshardable``): per parameter, the fp32 main
  weight and Adam's moments with the weight's own sharding (keys
  ``optimizer.state.{param,exp_avg,exp_avg_sq}.<weight key>``), so it resumes at any TP, PP,
  virtual stages, buckets and DP. Saving gathers each bucket over the data-parallel group, so
  every rank holds its model-parallel slice of the whole state in host memory for the save.

megatron-core 0.16's own ``fully_reshardable`` writes misplaced state for every bucket after the
first: it concatenates the buckets without the padding between them and then slices that with the
buffer's offsets, which count it. :func:`_per_parameter_state` builds the same tensors from each
bucket's own offset, and :func:`_load_per_parameter_state` reads them without touching Adam's step
count (torch's Adam keeps it per parameter; :func:`restore_distributed_adam_steps` sets it). Its
default (``fully_sharded_model_space``) cannot be saved at all.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist

DP_RESHARDABLE = "dp_reshardable"
FULLY_RESHARDABLE = "fully_reshardable"
OPTIMIZER_SHARDINGS = (DP_RESHARDABLE, FULLY_RESHARDABLE)
_STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


def optimizer_sharded_state_dict(
    optimizer, model_state: dict, is_loading: bool = False, sharding: str = DP_RESHARDABLE
) -> dict:
    """The optimizer's sharded state; ``sharding`` is the distributed optimizer's format (the
    checkpoint's when loading)."""
    if not _is_distributed(optimizer):
        return optimizer.sharded_state_dict(model_state, is_loading=is_loading)
    if is_loading:
        _fill_empty_distributed_optimizer_state(optimizer)
    metadata = {"distrib_optim_sharding_type": sharding}
    if sharding == FULLY_RESHARDABLE:
        # keys named by the weights alone, however the parameters split into chained parts
        metadata["chained_optim_avoid_prefix"] = True
        for part in _distributed_parts(optimizer):
            part.sharded_param_state_fully_reshardable = types.MethodType(
                _per_parameter_state, part
            )
            part.load_parameter_state_from_fully_reshardable = types.MethodType(
                _load_per_parameter_state, part
            )
    return optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)


def optimizer_parts(optimizer) -> list:
    """The megatron-core optimizers inside ``optimizer`` (a ChainedOptimizer or one)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _distributed_parts(optimizer):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [part for part in optimizer_parts(optimizer) if isinstance(part, DistributedOptimizer)]


def _is_distributed(optimizer) -> bool:
    return bool(_distributed_parts(optimizer))


def _buffer_range_maps(part, buffer_index: int) -> list:
    """The per-bucket range maps of one gradient buffer (megatron-core keys them by dtype and
    supports one dtype per buffer)."""
    (per_bucket,) = part.gbuf_ranges[buffer_index].values()
    return per_bucket


def _gathered_bucket_states(part, buffer, bucket_index: int, range_map: dict) -> dict:
    """Each parameter of one bucket → its whole fp32 main weight and moments, on the host: the
    ranks' contiguous shards of the bucket gathered over the data-parallel group."""
    bucket = buffer.buckets[bucket_index]
    group = part.data_parallel_group
    world = bucket.grad_data.numel()
    local = world // group.size()
    device = bucket.grad_data.device
    shards = {key: torch.zeros(local, dtype=torch.float32, device=device) for key in _STATE_KEYS}
    for model_param, ranges in range_map["param_map"].items():
        tensors = part._get_main_param_and_optimizer_states(model_param)
        start, end = ranges["gbuf_local"].start, ranges["gbuf_local"].end
        for key, shard in shards.items():
            shard[start:end].copy_(tensors[key].detach().view(-1))
    gathered = {}
    for key, shard in shards.items():
        pieces = [torch.empty_like(shard) for _ in range(group.size())]
        dist.all_gather(pieces, shard, group=group)
        gathered[key] = torch.cat(pieces).cpu()
    states = {}
    for model_param in bucket.params_list:
        start, end, _ = buffer.param_index_map[model_param]
        begin = start - bucket.offset  # the buffer's offsets count the padding before the bucket
        states[model_param] = {
            key: value[begin : begin + end - start].view(model_param.shape)
            for key, value in gathered.items()
        }
    return states


def _per_parameter_state(part, model_sharded_state_dict, is_loading=False, metadata=None):
    """megatron-core's ``fully_reshardable`` param state, in its order and with its keys, each
    parameter's slice taken from its own bucket. Loading needs shapes only."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    model_tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    by_param = {sh.data: sh for sh in nested_values(model_tensors)}
    state, index = {}, 0
    for buffer_index, buffer in enumerate(part.buffers):
        whole = {}
        if not is_loading:
            for bucket_index, range_map in enumerate(_buffer_range_maps(part, buffer_index)):
                whole.update(_gathered_bucket_states(part, buffer, bucket_index, range_map))
        for model_param in buffer.param_index_map:  # the order the loader walks
            meta = by_param[model_param]
            tensors = {}
            for key in _STATE_KEYS:
                data = (
                    torch.empty(model_param.shape, dtype=torch.float32)
                    if is_loading
                    else whole[model_param][key]
                )
                fields = dict(key=f"optimizer.state.{key}.{meta.key}", data=data)
                if not isinstance(meta, ShardedTensorFactory):
                    fields["dtype"] = data.dtype
                tensors[key] = replace(meta, **fields)
            state[index] = tensors
            index += 1
    return state


@torch.no_grad()
def _load_per_parameter_state(part, state_dict: dict) -> None:
    """Each local parameter's range of the loaded whole tensors into the optimizer (its other
    state, torch Adam's step, is kept)."""
    index = 0
    for buffer_index, buffer in enumerate(part.buffers):
        local = {}
        for range_map in _buffer_range_maps(part, buffer_index):
            local.update(range_map["param_map"])
        for model_param in buffer.param_index_map:
            loaded = state_dict[index]
            index += 1
            if model_param not in local:
                continue
            start, end = local[model_param]["param"].start, local[model_param]["param"].end
            tensors = dict(part._get_main_param_and_optimizer_states(model_param))
            for key in _STATE_KEYS:
                tensors[key] = loaded[key].reshape(-1)[start:end]
            part._set_main_param_and_optimizer_states(model_param, tensors)


def _distributed_torch_adams(optimizer):
    """(megatron-core part, its torch Adam) of each distributed optimizer inside ``optimizer``."""
    for part in _distributed_parts(optimizer):
        inner = getattr(part, "optimizer", None)
        if isinstance(inner, torch.optim.Adam):
            yield part, inner


def restore_distributed_adam_steps(optimizer) -> None:
    """The distributed optimizer keeps torch Adam's step count in its saved param groups and
    restores it into each parameter's state (one tensor shared by all of them), but its
    per-bucket state load then copies the in-memory step over it (0, from
    ``_fill_empty_distributed_optimizer_state``): Adam's bias correction would restart. The
    param groups' count is put back, one tensor per parameter (after either format's load)."""
    for _, inner in _distributed_torch_adams(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _fill_empty_distributed_optimizer_state(optimizer) -> None:
    """Give a distributed optimizer that has not stepped yet zero moments and step 0, to be
    overwritten by the checkpoint's. Without Transformer Engine or Apex, megatron-core's
    ``DistributedOptimizer.state_dict`` (which building the state to load into calls) reads the
    step count from torch Adam's per-parameter state, and fails on an empty one."""
    for part, inner in _distributed_torch_adams(optimizer):
        if inner.state or part.init_state_fn is None:
            continue
        part.init_state_fn(inner, part.config)
        for state in inner.state.values():
            state.setdefault("step", torch.zeros((), dtype=torch.float32))
