"""Muon for megatron-core models: Megatron-LM's ``--optimizer muon``, without its
``emerging_optimizers`` dependency (which needs Python 3.12 and Triton).

As megatron-core's ``get_megatron_muon_optimizer`` assembles it: the 2-D weights of the
transformer layers (attention and MLP projections, the experts', the router's) go to
:class:`Muon`, everything else (embeddings, the output layer, norms, biases) to megatron-core's
AdamW; the parts are chained (``ChainedOptimizer``), each in megatron-core's mixed-precision
wrapper, so the learning-rate scheduler, gradient clipping and checkpoints treat them as one
optimizer. The state is per parameter (Muon's momentum has the weight's sharding), so a
checkpoint resumes at any TP/PP/DP.

One Muon step for a weight ``W`` with gradient ``G`` (NVIDIA Emerging-Optimizers' rule, which
megatron-core runs): ``W -= lr * wd * W`` (decoupled weight decay);
``M = beta M + (1 - beta) G``; the direction ``D`` is ``M`` (or Nesterov's
``(1 - beta) G + beta M``); ``W -= lr * scale * NS(D)``, where ``NS`` is
:func:`~megatron_slm.training.newton_schulz.newton_schulz` (whole-matrix under tensor
parallelism by default) and ``scale`` is ``--muon-scale-mode``'s times
``--muon-extra-scale-factor``. A fused QKV weight is orthogonalised per query, key and value
block (``--muon-no-split-qkv``: as one matrix).

A step whose gradient norm is not finite changes nothing, decided on the device as torch's fused
Adam does (``found_inf``, set by ``training.optimizer.OptimizerStep``): no host read.
"""

from __future__ import annotations

import contextlib
import heapq

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import _get_param_groups as megatron_param_groups
from megatron.core.optimizer.optimizer import (
    ChainedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
)

from megatron_slm.training.newton_schulz import (
    coefficient_schedule,
    matmul_precision,
    newton_schulz_tp,
    scale_factor,
)

# Marks on a parameter (copied to its fp32 main copy): the row counts of the query, key and
# value blocks in one query group of a fused QKV weight; the experts' tensor-parallel group.
_QKV_SPLIT = "_muon_qkv_split"
_EXPERT = "_muon_expert"


class Muon(torch.optim.Optimizer):
    """Muon on 2-D tensor-parallel weights (see the module docstring). Groups carry ``lr`` and
    ``weight_decay`` (megatron-core's scheduler sets them every step). ``dp_group``: the ranks
    holding the same weights (data parallelism), which share the Newton-Schulz work."""

    def __init__(
        self,
        params,
        lr: float,
        weight_decay: float,
        momentum: float = 0.9,
        nesterov: bool = False,
        coefficient_type: str = "quintic",
        num_ns_steps: int = 5,
        scale_mode: str = "spectral",
        extra_scale_factor: float = 1.0,
        matmul_prec: str = "medium",
        tp_mode: str = "duplicated",
        dp_group: dist.ProcessGroup | None = None,
    ):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        # settings of the run, not of the saved param groups a checkpoint restores
        self.momentum, self.nesterov = momentum, nesterov
        self.coefficients = coefficient_schedule(coefficient_type, num_ns_steps)
        self.scale_mode, self.extra_scale_factor = scale_mode, extra_scale_factor
        self.matmul_prec, self.tp_mode = matmul_prec, tp_mode
        self.dp_group = dp_group
        self.found_inf: torch.Tensor | None = None  # 1.0: skip this step (on the device)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon takes no closure")
        entries = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for bucket in _buckets(entries, BUCKET_NUMEL):
            directions = [self._direction(group, p) for group, p in bucket]
            updates = self._orthogonalized([p for _, p in bucket], directions)
            for (group, p), update in zip(bucket, updates):
                p.add_(_unless(self.found_inf, update), alpha=-group["lr"])

    def _direction(self, group: dict, p: torch.Tensor) -> torch.Tensor:
        """Weight decay and momentum for ``p``; the direction to orthogonalise."""
        skip, lr, wd, beta = self.found_inf, group["lr"], group["weight_decay"], self.momentum
        grad = _unless(skip, p.grad)
        buf = self.state[p].get("momentum_buffer")
        if buf is None:
            buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        if wd:
            p.add_(_unless(skip, p), alpha=-lr * wd)
        if skip is None:
            buf.lerp_(grad, 1.0 - beta)
        else:
            buf.copy_(torch.where(skip > 0, buf, buf.lerp(grad, 1.0 - beta)))
        return grad.lerp(buf, beta) if self.nesterov else buf

    def _orthogonalized(self, params: list, directions: list) -> list[torch.Tensor]:
        """The updates of ``params``. With data parallelism each rank orthogonalises a share of
        them (balanced by size) and the ranks all-gather the results: every rank would compute
        the same values, so the update is the one each would have computed alone, at 1 / DP of
        the work. Tensor-parallel peers have one data-parallel rank, so they hold the same share
        (``duplicated`` and ``distributed`` communicate inside it)."""
        size = 1 if self.dp_group is None else self.dp_group.size()
        if size == 1:
            return [self.orthogonalize(p, d) for p, d in zip(params, directions)]
        numels = [p.numel() for p in params]
        owners = balanced_owners(numels, size)
        loads, offsets = [0] * size, []
        for numel, owner in zip(numels, owners):
            offsets.append(loads[owner])
            loads[owner] += numel
        rank, device = self.dp_group.rank(), params[0].device
        mine = torch.zeros(max(loads), dtype=torch.float32, device=device)
        for p, d, owner, start in zip(params, directions, owners, offsets):
            if owner == rank:
                mine[start : start + p.numel()].copy_(self.orthogonalize(p, d).reshape(-1))
        gathered = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(gathered, mine, group=self.dp_group)
        return [
            gathered[owner][start : start + p.numel()].view_as(p).to(p.dtype)
            for p, owner, start in zip(params, owners, offsets)
        ]

    def orthogonalize(self, p: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """The scaled orthogonal update of ``p`` (this rank's shard) for ``direction``."""
        tp = getattr(p, "tensor_model_parallel", False) and p.partition_dim >= 0
        partition_dim = p.partition_dim if tp else None
        if getattr(p, _EXPERT, False):
            group = parallel_state.get_expert_tensor_parallel_group()
        else:
            group = parallel_state.get_tensor_model_parallel_group()
        split = getattr(p, _QKV_SPLIT, None)
        if split is None:
            return self._scaled(direction, group, partition_dim)
        rows, cols = direction.shape
        groups = rows // sum(split)  # this rank's query groups
        blocks = direction.view(groups, sum(split), cols).split(split, dim=1)
        done = [
            self._scaled(b.reshape(-1, cols), group, partition_dim).view(groups, -1, cols)
            for b in blocks
        ]
        return torch.cat(done, dim=1).view(rows, cols)

    def _scaled(self, x: torch.Tensor, group, partition_dim: int | None) -> torch.Tensor:
        with matmul_precision(self.matmul_prec):
            out = newton_schulz_tp(
                x.float(), self.coefficients, self.matmul_prec == "medium", self.tp_mode, group,
                partition_dim,
            )  # fmt: skip
        rows, cols = x.shape
        if partition_dim is not None and self.tp_mode != "blockwise":
            if partition_dim == 0:
                rows *= group.size()
            else:
                cols *= group.size()
        scale = scale_factor(rows, cols, self.scale_mode) * self.extra_scale_factor
        return out.to(x.dtype) * scale


# The weights one all-gather of updates covers (fp32: 512 MiB gathered, plus the directions).
BUCKET_NUMEL = 1 << 27


def _buckets(entries: list, limit: int) -> list[list]:
    """Consecutive runs of ``entries`` (``(group, param)``) of at most ``limit`` elements (a
    larger weight alone)."""
    buckets, current, total = [], [], 0
    for entry in entries:
        numel = entry[1].numel()
        if current and total + numel > limit:
            buckets.append(current)
            current, total = [], 0
        current.append(entry)
        total += numel
    return buckets + ([current] if current else [])


def balanced_owners(numels: list[int], ranks: int) -> list[int]:
    """The rank that orthogonalises each weight: largest first, each to the least-loaded rank
    (the lowest such rank on ties): the same answer on every rank."""
    heap, owners = [(0, r) for r in range(ranks)], [0] * len(numels)  # (load, rank)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        load, owner = heapq.heappop(heap)
        owners[i] = owner
        heapq.heappush(heap, (load + numels[i], owner))
    return owners


def _unless(skip: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``x``, or zeros where the step is skipped (``skip`` 1.0; NaN or inf in ``x`` included):
    the same values as ``x`` when it is not, so a step taken is the step without the flag."""
    return x if skip is None else torch.where(skip > 0, 0.0, x)


def is_muon_parameter(name: str, param: torch.nn.Parameter) -> bool:
    """Muon takes the 2-D weights of the layers; embeddings (word and position), the output
    layer and every 1-D parameter stay on AdamW (megatron-core's rule, position embeddings
    added: they are a lookup table, not a linear map)."""
    if param.dim() != 2 or getattr(param, "is_embedding_or_output_parameter", False):
        return False
    return "embedding" not in name and "output_layer" not in name


def _init_momentum(optimizer, config=None) -> None:
    """megatron-core's ``init_state_fn``: empty state to load a checkpoint's into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p.data)


def _wrapped(muon: Muon, config: OptimizerConfig):
    """megatron-core's mixed-precision wrapper around ``muon`` (fp32 main weights with bf16),
    the marks carried to the main weights Muon then sees."""
    if not config.bf16:
        return FP32Optimizer(muon, config, _init_momentum)
    wrapper = Float16OptimizerWithFloat16Params(muon, config, None, _init_momentum)
    for model_group, main_group in zip(wrapper.float16_groups, wrapper.fp32_from_float16_groups):
        for model_param, main_param in zip(model_group, main_group):
            for mark in (_QKV_SPLIT, _EXPERT):
                if hasattr(model_param, mark):
                    setattr(main_param, mark, getattr(model_param, mark))
    return wrapper


def build_muon_optimizer(config: OptimizerConfig, chunks, muon_args, use_gloo_process_groups):
    """The chained Muon + AdamW optimizer of ``chunks`` (``config``: megatron-core's AdamW
    settings, also Muon's learning rate and weight decay; ``muon_args``: the --muon-* flags)."""
    muon_params, other_params = [], []
    for chunk in chunks:
        model_config = chunk.config
        heads, query_groups = model_config.num_attention_heads, model_config.num_query_groups
        kv = model_config.kv_channels
        qkv_split = (heads // (query_groups or heads) * kv, kv, kv)
        for name, param in chunk.named_parameters():
            if not param.requires_grad:
                continue
            if not is_muon_parameter(name, param):
                other_params.append(param)
                continue
            muon_params.append(param)
            setattr(param, _EXPERT, "experts" in name and "shared" not in name)
            if muon_args.split_qkv and name.endswith("linear_qkv.weight"):
                setattr(param, _QKV_SPLIT, qkv_split)
    kwargs = dict(
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=muon_args.muon_momentum,
        nesterov=muon_args.muon_nesterov,
        coefficient_type=muon_args.muon_coefficient_type,
        num_ns_steps=muon_args.muon_num_ns_steps,
        scale_mode=muon_args.muon_scale_mode,
        extra_scale_factor=muon_args.muon_extra_scale_factor,
        matmul_prec=muon_args.muon_fp32_matmul_prec,
        tp_mode=muon_args.muon_tp_mode,
    )
    with _frozen(other_params):  # megatron-core's groups (weight decay, lr) of Muon's weights
        groups = megatron_param_groups(chunks, config, None)
    parts = []
    for expert in (False, True):  # (the ranks holding copies of the weights differ)
        part_groups = [g for g in groups if g["is_expert_parallel"] == expert]
        if not part_groups:
            continue
        if expert:
            dp_group = parallel_state.get_expert_data_parallel_group()
        else:
            dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        part = _wrapped(Muon(part_groups, dp_group=dp_group, **kwargs), config)
        if expert:  # megatron-core's statistics group for expert parameters
            part.grad_stats_parallel_group = (
                parallel_state.get_expert_tensor_model_pipeline_parallel_group()
            )
        parts.append(part)
    with _frozen(muon_params):
        adam = get_megatron_optimizer(
            config, chunks, use_gloo_process_groups=use_gloo_process_groups
        )
    return ChainedOptimizer(parts + list(getattr(adam, "chained_optimizers", [adam])))


@contextlib.contextmanager
def _frozen(params):
    """``requires_grad`` off for ``params`` inside the block (how megatron-core picks which
    parameters an optimizer it builds takes)."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
