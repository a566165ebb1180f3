"""Process-group setup shared by every entry point (trainer, scorer, converter, evaluator).

Rank and world size come from torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or SLURM
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, rendezvous at the first node of
``SLURM_JOB_NODELIST`` unless ``MASTER_ADDR`` is set); a plain ``python`` run is a world of one.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_slm.errors import ConfigError
from megatron_slm.platform import distributed_backend, enable_cpu_backend, resolve_device

logger = logging.getLogger("megatron_slm")


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int


def process_info() -> ProcessInfo:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return ProcessInfo(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
    return ProcessInfo(0, 1, 0)


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def _loopback_interface() -> str:
    """The loopback interface's name (``lo`` on Linux, ``lo0`` on macOS)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n.startswith("lo")), "lo")


def _init_single_process(backend: str, timeout: datetime.timedelta) -> None:
    """A world of one listens on no network interface: nobody else has to join.

    The env:// rendezvous would start a TCPStore server, which binds every interface (``[::]``)
    whatever MASTER_ADDR says, unauthenticated; an in-process HashStore needs no socket. Gloo and
    NCCL still open their own transport listeners, on the interface the hostname resolves to
    unless told otherwise: pinned to loopback here (an explicit setting is kept).
    """
    loopback = _loopback_interface()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


DEFAULT_RANK_ORDER = "tp-cp-ep-dp-pp"
"""megatron-core's order of the parallel dimensions over the ranks (the fastest-varying first)."""
TP_PP_DP_ORDER = "tp-cp-ep-pp-dp"
"""Megatron-LM's --use-tp-pp-dp-mapping: a replica's pipeline stages on neighbouring ranks."""
_rank_order = DEFAULT_RANK_ORDER


def rank_order() -> str:
    """The order :func:`initialize` last laid the parallel dimensions out in."""
    return _rank_order


def initialize(
    *,
    device: str = "auto",
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    seed: int = 1234,
    timeout_minutes: int = 30,
    order: str = DEFAULT_RANK_ORDER,
    gloo_groups: bool = True,
    optimizer_instances: int = 1,
) -> torch.device:
    """Init torch.distributed + megatron-core's parallel state + seeds; returns the device.
    ``order``: megatron-core's order of the parallel dimensions over the ranks; ``gloo_groups``
    False: megatron-core creates no gloo data-parallel side groups; ``expert_tensor_parallel_size``
    None: the TP size (megatron-core's default); ``optimizer_instances``: the distributed
    optimizer's instances over the data-parallel ranks (their groups).

    Idempotent for the process group; the parallel state is (re)initialised each call.
    """
    global _rank_order
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    dev = resolve_device(device)
    info = process_info()
    if dev.type == "cpu":
        enable_cpu_backend()
        if "OMP_NUM_THREADS" not in os.environ:
            # Like torchrun: ranks on one machine share its cores instead of oversubscribing them
            # (plain python and srun leave the thread count at all cores per rank).
            local = int(
                os.environ.get("LOCAL_WORLD_SIZE")
                or os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
                or info.world_size
            )
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
    else:
        torch.cuda.set_device(info.local_rank)
        dev = torch.device("cuda", info.local_rank)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if info.world_size == 1:
            _init_single_process(distributed_backend(dev), timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
            if "MASTER_PORT" not in os.environ:
                # Same port on every task: derived from the job id under SLURM.
                job = int(os.environ.get("SLURM_JOB_ID", "0"))
                os.environ["MASTER_PORT"] = str(20000 + job % 20000)
            dist.init_process_group(
                distributed_backend(dev),
                rank=info.rank,
                world_size=info.world_size,
                timeout=timeout,
            )
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if info.world_size % (tp * pp):
        raise ConfigError(
            f"world size {info.world_size} is not divisible by --tensor-model-parallel-size {tp} "
            f"x --pipeline-model-parallel-size {pp}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        order=order,
        create_gloo_process_groups=gloo_groups,
        num_distributed_optimizer_instances=optimizer_instances,
    )
    _rank_order = order
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return dev


# The config fields a job's layout is read from (``runtime.LoadArgs`` and the configs built on it).
_LAYOUT_FIELDS = ("device", "tensor_model_parallel_size", "pipeline_model_parallel_size", "seed")


# NCCL's all-reduce algorithms whose sums are reproducible run to run (Megatron-LM's list): its
# default picks one by message size and topology, NVLS among them, whose reductions are not.
DETERMINISTIC_NCCL_ALGOS = ("Tree", "Ring", "CollnetDirect", "CollnetChain", "^NVLS")


def enable_deterministic_mode() -> None:
    """--deterministic-mode (Megatron-LM's): torch's deterministic algorithms (an op without one
    raises), cuBLAS's reproducible workspace and Transformer Engine's deterministic attention,
    unless the environment chose otherwise. Call before the first CUDA work."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
    torch.use_deterministic_algorithms(True)


def initialize_for(config, **overrides) -> torch.device:
    """:func:`initialize` with the layout a job's config declares: whichever of ``device``,
    ``tensor_model_parallel_size``, ``pipeline_model_parallel_size`` and ``seed`` it has (the
    rest keep their defaults); ``overrides`` win."""
    layout = {f: getattr(config, f) for f in _LAYOUT_FIELDS if hasattr(config, f)}
    return initialize(**{**layout, **overrides})


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_rank0(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank: how a decision made on the writer
    rank (what to do next, or the error to stop with) reaches the others."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def raise_on_every_rank(error: str | None, kind: type[Exception]) -> None:
    """Collective: if rank 0 hit ``error``, every rank raises ``kind(error)``, so no rank waits
    in a later collective for one that has stopped."""
    err = broadcast_from_rank0(error)
    if err is not None:
        raise kind(err)
