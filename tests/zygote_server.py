"""A preloaded Python that forks the tests' launches: ``python -m tests.zygote_server SOCKET``.

Every trainer or tool a test launches spends about 4 s importing torch and megatron-core before it
does any work, and the suite launches several hundred of them. This server imports them once,
then, for each request on its Unix socket, forks a child that becomes the requested
``python [-u] (-m MODULE | -c CODE | SCRIPT) ARGS...``: the request's stdin/stdout/stderr (passed
as file descriptors), working directory, environment and argv, run by ``runpy`` as ``python``
would. The child is a real process: its own pid (a new session when asked), signals, exit status.

What differs from a fresh interpreter, and how it is kept out of the way:
- Imports done here read the environment once, so the client (``tests/zygote.py``) forks only
  for requests whose import-time environment is the server's: the variables read while
  preloading (recorded below) and those of the prefixes in :data:`IMPORT_TIME_PREFIXES`.
- The random generators are reseeded in each child (``random`` by Python itself after a fork;
  numpy's and torch's here) as a fresh interpreter seeds them. The hash seed is the server's:
  the client alternates launches between two servers, so a run and its resume see different ones.
- Warnings the preloaded imports print appear once, in the server's log, not in each child.
- The child exits as multiprocessing's children do: threads joined, atexit handlers run, streams
  flushed, then ``os._exit`` without the module teardown (1.2 s of freeing the preloaded modules).

Protocol: the client sends one JSON line (what to run, cwd, env, new_session, unbuffered) with
three file descriptors; the server answers ``{"pid": N}`` and, when the child ends,
``{"status": S}`` (the raw ``waitpid`` status), then closes the connection.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys

# Variables of these prefixes may be read at import by native code (OpenMP, torch's C++, the
# loader, the interpreter) where recording os.environ does not see them. (Libraries that scan the
# environment for their own prefixes make the recorded set every variable set at the start.)
IMPORT_TIME_PREFIXES = (
    "PYTHON", "LD_", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "MALLOC_", "TORCH_",
    "PYTORCH_", "CUDA_", "NVIDIA_",
)  # fmt: skip
# What the tests' launches import: the trainer, the runtime and torchrun.
PRELOAD = (
    "torch",
    "numpy",
    "megatron.core",
    "megatron_slm.pretrain",
    "megatron_slm.training.loop",
    "megatron_slm.runtime",
    "torch.distributed.run",
)


class _RecordingEnviron(type(os.environ)):
    """os.environ that remembers which variables were read (while preloading)."""

    read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def preload() -> tuple[list[str], dict[str, str]]:
    """Import :data:`PRELOAD`; the environment variables the imports read, and those they set
    (``TORCHINDUCTOR_CACHE_DIR``), which each child gets as a fresh interpreter would."""
    import importlib

    before = dict(os.environ)
    os.environ.__class__ = _RecordingEnviron
    try:
        for name in PRELOAD:
            importlib.import_module(name)
    finally:
        os.environ.__class__ = _RecordingEnviron.__mro__[1]
    set_by_imports = {k: v for k, v in os.environ.items() if before.get(k) != v}
    os.environ.clear()
    os.environ.update(before)
    return sorted(_RecordingEnviron.read), set_by_imports


def serve(listener: socket.socket) -> tuple[dict, list[int]]:
    """Answer requests until the server is told to stop (exits) or, in a forked child, return
    that child's request and its three file descriptors."""
    children: dict[int, socket.socket] = {}  # pid -> the connection that asked for it
    parent = os.getppid()
    while True:
        ready, _, _ = select.select([listener], [], [], 0.05)
        if ready:
            conn, _ = listener.accept()
            conn.settimeout(30)
            try:
                request, fds = _receive(conn)
            except (OSError, ValueError) as err:
                print(f"zygote: bad request: {err}", file=sys.stderr, flush=True)
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in children.values():
                    other.close()
                conn.close()
                return request, fds
            for fd in fds:
                os.close(fd)
            children[pid] = conn
            _send(conn, {"pid": pid})
        _reap(children)
        if os.getppid() != parent:  # the test process is gone: so are the tests
            _stop(children)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 22, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 22)
        if not more:
            raise ValueError("truncated request")
        data += more
    if len(fds) != 3:
        raise ValueError(f"{len(fds)} file descriptors, not 3")
    return json.loads(data), fds


def _send(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        pass  # the client went away; the child runs on, as an orphaned process would


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            _send(conn, {"status": status})
            conn.close()


def _stop(children: dict[int, socket.socket]) -> None:
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(0)


def become(request: dict, fds: list[int], socket_path: str, hello: dict):
    """Turn this forked child into the requested interpreter run, and exit as it would."""
    import random

    if request["new_session"]:
        os.setsid()
    for target, fd in enumerate(fds):
        if fd != target:
            os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for key, value in hello["set"].items():  # as the imports do: where the caller did not
        os.environ.setdefault(key, value)
    if request["unbuffered"]:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            stream.flush()
            raw = open(stream.fileno(), "wb", buffering=0, closefd=False)  # noqa: SIM115
            new = type(stream)(raw, encoding=stream.encoding, errors=stream.errors)
            new.reconfigure(write_through=True)
            setattr(sys, name, new)
    _reseed(random)
    if request["kind"] == "module" and request["target"] == "torch.distributed.run":
        _torchrun_forks_its_workers(socket_path, hello)
    try:
        _run(request["kind"], request["target"], request["args"])
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException as err:  # noqa: BLE001 - reported as the interpreter reports it
        tb = err.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        sys.excepthook(type(err), err.with_traceback(tb), tb)
        code = 1
        if isinstance(err, KeyboardInterrupt):  # python then dies of the SIGINT itself
            code = -signal.SIGINT
    _exit(code)


def _run(kind: str, target: str, args: list[str]) -> None:
    import runpy
    import types

    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    if kind == "module":
        sys.modules.pop(target, None)  # python -m runs it as __main__ only, not also by name
        sys.argv = [target, *args]  # runpy puts the module's file first
        sys.path[0] = os.getcwd()
        runpy._run_module_as_main(target, alter_argv=True)
    elif kind == "script":
        sys.argv = [target, *args]
        sys.path[0] = os.path.dirname(os.path.abspath(target))
        runpy.run_path(target, run_name="__main__")
    else:  # -c
        sys.argv = ["-c", *args]
        sys.path[0] = ""
        exec(compile(target, "<string>", "exec"), main.__dict__)  # noqa: S102


def _exit_code(code) -> int:
    """SystemExit's code as the interpreter turns it into an exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _exit(code: int) -> None:
    """The interpreter's exit up to its module teardown: non-daemon threads joined, atexit
    handlers run, the standard streams flushed. The teardown itself (about 1.2 s of freeing
    the preloaded modules, in a fresh interpreter as here) is skipped with ``os._exit``, as
    multiprocessing's children do."""
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _reseed(random) -> None:
    """As a fresh interpreter: numpy's global generator from the OS, torch's default generator
    to a non-deterministic seed (random reseeds itself after a fork)."""
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


def _torchrun_forks_its_workers(socket_path: str, hello: dict) -> None:
    """torchrun starts each worker with ``subprocess.Popen([sys.executable, ...])``: route those
    through this server too, when their environment allows (tests/zygote.py decides)."""
    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler

    from tests import zygote

    server = zygote.ServerInfo(socket_path, hello["env"], hello["read"], hello["set"])

    def popen(handler, args, env):
        return zygote.Popen(
            list(args), env=env, stdout=handler._stdout, stderr=handler._stderr,
            start_new_session=True, server=server,
        )  # fmt: skip

    subprocess_handler.SubprocessHandler._popen = popen


def main(argv: list[str]) -> None:
    socket_path = argv[0]
    read, set_by_imports = preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    hello = {"read": read, "env": dict(os.environ), "set": set_by_imports}
    print(json.dumps(hello), flush=True)  # the client waits for this line
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    request, fds = serve(listener)
    become(request, fds, socket_path, hello)


if __name__ == "__main__":
    main(sys.argv[1:])
