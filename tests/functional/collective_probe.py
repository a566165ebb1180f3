"""``python -m megatron_slm.pretrain`` with the data-parallel gradient and parameter collectives
recorded: run as ``torchrun ... tests/functional/collective_probe.py PRETRAIN_ARGS``.

torch's ``reduce_scatter_tensor``, ``all_gather_into_tensor`` and ``all_reduce`` are wrapped
before megatron-core imports them (its buffers bind them at import), or rebound in its buffers'
module where that was imported already. Each call made by
megatron-core's gradient buffers (``param_and_grad_buffer``) is recorded with where it was
issued: inside an autograd backward (``torch._C._current_graph_task_id() != -1``), inside the
optimizer step (``step_with_ready_grads`` on the stack), inside a forward pre-hook of
megatron-core's DDP, and over how many ranks. Rank r writes its list to
``$COLLECTIVE_PROBE_OUT.r.json`` at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

import torch
import torch.distributed as dist

CALLS: list[dict] = []


def _recorded(kind: str, collective):
    def wrapper(*args, **kwargs):
        frames, f = [], sys._getframe(1)
        while f is not None:
            frames.append((os.path.basename(f.f_code.co_filename), f.f_code.co_name))
            f = f.f_back
        if frames and frames[0][0] == "param_and_grad_buffer.py":
            CALLS.append({
                "kind": kind,
                "in_backward": torch._C._current_graph_task_id() != -1,
                "in_optimizer_step": any(name == "step_with_ready_grads" for _, name in frames),
                "in_forward_pre_hook": ("distributed_data_parallel.py", "hook") in frames,
                "async": bool(kwargs.get("async_op", False)),
                "group_size": dist.get_world_size(kwargs.get("group")),
                "numel": max(a.numel() for a in args if isinstance(a, torch.Tensor)),
            })  # fmt: skip
        return collective(*args, **kwargs)

    return wrapper


def _write() -> None:
    out = os.environ["COLLECTIVE_PROBE_OUT"]
    with open(f"{out}.{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump(CALLS, f)


_originals = (dist.reduce_scatter_tensor, dist.all_gather_into_tensor)
dist.reduce_scatter_tensor = _recorded("reduce_scatter", dist.reduce_scatter_tensor)
dist.all_gather_into_tensor = _recorded("all_gather", dist.all_gather_into_tensor)
dist.all_reduce = _recorded("all_reduce", dist.all_reduce)
# Forked from a test server that imported megatron-core already (tests/zygote_server.py): its
# buffers bound the originals then, so they are rebound here.
_buffers = sys.modules.get("megatron.core.distributed.param_and_grad_buffer")
if _buffers is not None:
    if _buffers.dist_reduce_scatter_func is _originals[0]:
        _buffers.dist_reduce_scatter_func = dist.reduce_scatter_tensor
    if _buffers.dist_all_gather_func is _originals[1]:
        _buffers.dist_all_gather_func = dist.all_gather_into_tensor

if __name__ == "__main__":
    atexit.register(_write)
    from megatron_slm.pretrain import main

    sys.exit(main(sys.argv[1:]))
