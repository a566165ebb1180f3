"""The queue through which megatron-core's checkpoint writers report, served by a helper of this
rank that imports nothing but the standard library.

megatron-core makes that queue on a ``multiprocessing`` manager started with the ``spawn`` method,
whose server first re-imports the launching module (``megatron_slm.pretrain`` and so torch and
megatron-core: about 4 s of CPU and 300 MB per rank, on the first save of every process), then
outlives a rank killed mid-save (SIGKILL, OOM): an orphan holding the job's output pipes open, on
which torchrun's caller then waits forever; and it dies of the job's exit signal, after which the
exit save cannot report. Ours is a bare interpreter (``python -I -c``, 20 MB) that serves the same
``SyncManager``: the kernel kills it when the rank dies (``PR_SET_PDEATHSIG``), it ignores the
signals a job's exit may use (SLURM signals every process of a step), and megatron-core's forked
writers use its queue as they used the manager's.
"""

from __future__ import annotations

import ast
import atexit
import multiprocessing
import os
import pickle
import subprocess
import sys
from multiprocessing.managers import SyncManager

_SERVER = """
import ctypes, os, signal, sys
from multiprocessing.managers import SyncManager
if sys.platform == "linux":
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[1]):  # the rank died before the line above
        sys.exit(0)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, signal.SIG_IGN)
server = SyncManager(authkey=sys.stdin.buffer.read()).get_server()
print(repr(server.address), flush=True)
server.serve_forever()
"""

_servers: list[tuple[int, subprocess.Popen]] = []  # (the rank's pid, its helper)


def install() -> None:
    """Makes megatron-core's writers report through a queue of this rank's own helper (once per
    process; a save calls it first)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = PickledQueue(start_queue())


class PickledQueue:
    """A queue proxy whose items travel pickled: the server holds bytes, so it never imports
    the classes of what the writers report (torch's ``WriteResult``: the whole of torch)."""

    def __init__(self, proxy):
        self.proxy = proxy

    def put(self, item, block=True, timeout=None) -> None:
        self.proxy.put(pickle.dumps(item), block, timeout)

    def get(self, block=True, timeout=None):
        return pickle.loads(self.proxy.get(block, timeout))

    def get_nowait(self):
        return pickle.loads(self.proxy.get_nowait())


def start_queue():
    """A ``queue.Queue`` proxy served by a new helper process (see the module's docstring)."""
    authkey = bytes(multiprocessing.current_process().authkey)
    server = subprocess.Popen(
        [sys.executable, "-I", "-c", _SERVER, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    _servers.append((os.getpid(), server))
    server.stdin.write(authkey)
    server.stdin.close()
    line = server.stdout.readline().decode()
    server.stdout.close()
    if not line:
        raise RuntimeError(f"the checkpoint writers' queue server exited ({server.wait()})")
    manager = SyncManager(address=ast.literal_eval(line), authkey=authkey)
    manager.connect()
    return manager.Queue()


@atexit.register
def _stop_servers() -> None:
    """The helpers end with their rank where no death signal does it (not Linux); a forked child
    leaves its parent's alone."""
    for pid, server in _servers:
        if pid == os.getpid():
            server.kill()
            server.wait()
