"""Run a function in N real processes joined by a gloo process group (CPU).

Used by the multi-process tests: ``run_distributed(fn, world_size, *args)`` starts ``world_size``
processes, initializes ``torch.distributed`` with gloo on a free localhost port, calls
``fn(rank, world_size, *args)`` in each and returns the list of results ordered by rank. ``fn`` must
be importable at module level (the processes import it by name). An exception in any rank is
re-raised in the parent with that rank's traceback.

The processes come from multiprocessing's fork server, which has imported torch, megatron-core
and the trainer once (tests/zygote_server.py's list): a spawned interpreter spends about 4 s on
those imports before ``fn`` starts. Each process gets this process's environment and fresh
random seeds, as a spawned one would. They are spawned where forking is not safe
(``tests.zygote.forking_is_safe``: on a GPU machine, or turned off).
"""

from __future__ import annotations

import io
import os
import random
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp

# Ports this process has handed out: a launcher may not have bound one yet when the next is drawn.
_HANDED_OUT: set[int] = set()
# Below the SLURM launches' default MASTER_PORT range (launch.py: 20000 + job id % 20000).
_PORT_FLOOR, _PORT_CEILING = 10000, 20000


def free_port() -> int:
    """A localhost TCP port that is free now and that nothing but an explicit bind will take.

    A port from ``bind(0)`` comes from the kernel's ephemeral range, which it also hands to every
    outgoing connection (another test's gloo ranks, say) until the launcher binds it: CI failed
    once on torchrun's EADDRINUSE that way. These ports lie below the ephemeral range, and each
    pytest-xdist worker draws from its own slice, so two workers never hand out the same one.
    """
    ceiling = min(_PORT_CEILING, _ephemeral_floor())
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0)
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    span = (ceiling - _PORT_FLOOR) // workers
    if span < 100:  # an unusual kernel setting: fall back to the kernel's choice
        return _kernel_port()
    start = _PORT_FLOOR + (worker % workers) * span
    draw = random.Random(os.getpid() * 1_000_003 + time.monotonic_ns())
    for _ in range(500):
        port = start + draw.randrange(span)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free localhost port in [{start}, {start + span})")


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _kernel_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, environ, fn, args, queue):
    import numpy as np
    import torch.distributed as dist

    os.environ.clear()
    os.environ.update(environ)  # the caller's now, not the fork server's when it started
    random.seed()
    np.random.seed()
    torch.seed()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    # One intra-op thread per rank: the machine has 2 cores and ranks share them.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Serialised to bytes: tensors put on the queue directly travel as shared-memory file
        # descriptors, which vanish when this process exits before the parent reads them.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0):
    from tests.zygote import forking_is_safe
    from tests.zygote_server import PRELOAD

    if forking_is_safe():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([*PRELOAD, "tests.dist_helpers"])
    else:
        ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, environ, fn, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
