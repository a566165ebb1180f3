"""Device selection and the CPU backend for megatron-core.

megatron-core is written for CUDA. Its modules reach the GPU in four ways:

1. ``torch.cuda.current_device()`` as a ``device=`` argument (attention buffers, RoPE, GPTModel,
   tensor-parallel mappings, pipeline p2p, the DDP grad buffer, transformer layers);
2. ``device="cuda"`` literals and ``.cuda()`` calls (pipeline schedules' token counters, the
   optimizer's found-inf / grad-norm tensors, grad clipping, utilities);
3. ``torch.cuda.synchronize()``, the CUDA RNG state API (``tensor_parallel.random``'s tracker)
   and CUDA streams (DDP's with several distributed-optimizer instances);
4. type checks such as ``param.type() == 'torch.cuda.FloatTensor'`` (grad clipping, the
   distributed optimizer's parameter groups).

:func:`enable_cpu_backend` makes all four work on CPU, so the *real* ``GPTModel``, tensor-parallel
layers, pipeline schedules (1F1B, interleaved), ``DistributedDataParallel`` and the optimizer run
with the gloo backend, unmodified:

* a :class:`torch.overrides.TorchFunctionMode` rewrites every ``device=`` that names CUDA (a string,
  a ``torch.device`` or a bare device index) to ``cpu``, turns ``Tensor.cuda()`` / ``.to("cuda")``
  into no-ops and drops ``pin_memory``, and ``Tensor.type()`` (no argument: the type's name) says
  ``torch.cuda.FloatTensor`` for a CPU float tensor: the CPU plays the CUDA device throughout;
* ``torch.cuda.current_device`` returns ``0`` (then mapped to CPU by the mode; the CPU device
  where the mode is off, as in a backward, which runs inside its handler), ``synchronize`` is
  a no-op, the CUDA RNG state functions act on the CPU generator (CPU dropout draws from it, so
  megatron's RNG tracker forks the right state), and a CUDA stream or event is a stand-in whose
  waits do nothing (CPU work runs in issue order); the all-to-all token dispatcher's split
  sizes become host arrays as they do on GPU;
* grad clipping's CUDA type check is given a CPU-aware ``multi_tensor_applier``-free path.

Limits (by design; none of this is active when CUDA is available):

* fp32 only (megatron-core's mixed-precision optimizer is CUDA-only, so the trainer refuses
  --bf16/--fp16 on CPU); no Transformer Engine, no fused kernels, no CUDA graphs, no
  activation offloading, no MoE token dispatchers that use NCCL-only collectives (the allgather
  and all-to-all ones run). The distributed optimizer and overlapped data-parallel
  communication (``overlap_grad_reduce`` / ``overlap_param_gather``: gloo's asynchronous
  collectives) do run.
* The TorchFunctionMode is thread-local: it is pushed in the calling thread and stays active for the
  life of the process. Worker threads that build CUDA tensors (none in our code paths) would not
  see it.
* gloo matches point-to-point messages by posting order, so on CPU the model provider turns off
  megatron's batched p2p (``batch_p2p_comm``), whose op order mixes up activations and gradients
  between two pipeline ranks in the interleaved schedule.
* It is a test and small-run path: speed is that of eager CPU PyTorch with gloo.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

from megatron_slm.cli import arg
from megatron_slm.errors import ConfigError

logger = logging.getLogger("megatron_slm")

DEVICES = ("auto", "cpu", "cuda")

_CPU = torch.device("cpu")
_enabled = False


def device_arg():
    """The ``--device`` flag of every job that runs a megatron model: one definition, one default
    (``runtime.DeviceArgs`` and the trainer's ``TrainingArgs`` both use it)."""
    return arg("auto", "auto (cuda when available, else cpu), cpu or cuda.", choices=DEVICES)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device not in DEVICES:
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch.cuda.is_available() is False")
    return torch.device(device)


def distributed_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer is how torch.cuda.current_device() is passed around.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement in torch calls to CPU (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else "torch.cuda." + name[len("torch.") :]
        return func(*args, **kwargs)


def _current_device():
    """``torch.cuda.current_device()`` on CPU: 0, which the mode maps to the CPU; where the mode
    is not active, the CPU device itself. A backward runs inside the mode's handler for
    ``torch.autograd.backward`` (a mode is off while its handler runs), and megatron-core
    allocates there with ``device=torch.cuda.current_device()`` (sequence parallelism's
    reduce-scatter)."""
    return 0 if torch._C._is_torch_function_mode_enabled() else _CPU


def _cpu_rng_stand_ins() -> None:
    """CUDA RNG API → the CPU default generator, for megatron's RNG tracker."""
    from megatron.core.tensor_parallel import random as mcore_random

    def get_state(*_args, **_kwargs):
        return torch.get_rng_state()

    def set_state(new_state, *_args, **_kwargs):
        torch.set_rng_state(new_state)

    torch.cuda.get_rng_state = get_state
    torch.cuda.set_rng_state = set_state
    torch.cuda.random.get_rng_state = get_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None
    mcore_random._get_cuda_rng_state = get_state
    mcore_random._set_cuda_rng_state = set_state
    # The tracker warns when the CPU generator moved inside a fork: here it is the forked state
    # (dropout under the tracker draws from it), so the warning would fire at every dropout.
    logging.getLogger(mcore_random.__name__).addFilter(_ForkedCpuStateIsExpected())


class _ForkedCpuStateIsExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "CPU RNG state changed within GPU RNG context"


def _cpu_grad_clipping() -> None:
    """megatron's ``clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor`` grads."""
    from megatron.core.optimizer import clip_grads, optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr) for p in parameters if getattr(p, attr) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


class _CpuEvent:
    """``torch.cuda.Event`` on CPU: recorded work is already done."""

    def __init__(self, *_args, **_kwargs):
        pass

    def record(self, _stream=None) -> None:
        pass

    def wait(self, _stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuStream:
    """``torch.cuda.Stream`` on CPU: operations run in issue order, so there is nothing to wait
    for (megatron-core's DDP reduces across distributed-optimizer instances on a stream of its
    own; its all-to-all token dispatcher copies counts to the host on one)."""

    def __init__(self, *_args, **_kwargs):
        pass

    def wait_stream(self, _other) -> None:
        pass

    def wait_event(self, _event) -> None:
        pass

    def record_event(self, event=None) -> _CpuEvent:
        return event or _CpuEvent()

    def synchronize(self) -> None:
        pass


def _cpu_streams() -> None:
    default = _CpuStream()
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent
    torch.cuda.stream = lambda _stream=None: contextlib.nullcontext()
    torch.cuda.default_stream = lambda *_args, **_kwargs: default
    torch.cuda.current_stream = lambda *_args, **_kwargs: default


def _cpu_token_dispatch() -> None:
    """megatron-core's all-to-all token dispatcher moves its split sizes to the host as numpy
    arrays (``maybe_move_tensor_to_cpu(as_numpy=True)``), converting only CUDA tensors: on CPU
    they would stay tensors, which ``all_to_all_single`` refuses as split sizes."""
    from megatron.core.transformer.moe import token_dispatcher

    def to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = to_host


def enable_cpu_backend() -> bool:
    """Activate the CPU backend in this process. Returns False (and does nothing) with CUDA.

    Idempotent. Call before building megatron-core models on CPU.
    """
    global _enabled
    if _enabled:
        return True
    if torch.cuda.is_available():
        return False
    torch.cuda.current_device = _current_device
    torch.cuda.synchronize = lambda *_args, **_kwargs: None
    _cpu_rng_stand_ins()
    _cpu_grad_clipping()
    _cpu_streams()
    _cpu_token_dispatch()
    # Entered for the life of the process (see "Limits" above).
    _CudaToCpuMode().__enter__()
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _enabled = True
    logger.info("megatron-core CPU backend enabled (gloo, torch SDPA attention)")
    return True


def cpu_backend_enabled() -> bool:
    return _enabled
