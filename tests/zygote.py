"""``subprocess.run`` / ``subprocess.Popen`` for the tests' ``[sys.executable, ...]`` launches,
forked from a preloaded interpreter (``tests/zygote_server.py``) instead of importing torch and
megatron-core afresh: about 4 s saved per launch. With multiprocessing's fork server in
``run_distributed``, the suite went from 23.6 to 12.9 minutes on 2 cores (2026-12-06, one machine).

The launched program runs as it would from the shell, in a process of its own, with the given
argv, environment, working directory and standard streams; tests read its exit status, output
and files as before, and may signal it. A launch that cannot be forked faithfully falls back to
``subprocess`` (the same call): an interpreter option other than ``-u``, ``shell``,
``preexec_fn`` or ``pass_fds``, or an environment that differs from every server's where imports
read it. ``MEGATRON_SLM_TEST_ZYGOTE=0`` sends every launch to ``subprocess``, and so does a
machine with a GPU (:func:`forking_is_safe`).

Tests that check what a fresh interpreter imports keep calling ``subprocess``.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import weakref

from tests.zygote_server import IMPORT_TIME_PREFIXES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENABLED = os.environ.get("MEGATRON_SLM_TEST_ZYGOTE", "1") != "0"
# A file to which each launch appends whether it was forked, and from which server, or why not.
LOG = os.environ.get("MEGATRON_SLM_TEST_ZYGOTE_LOG")
# Variables whose values imports do not use: set by torchrun for its workers (read when a NCCL
# group is made), and pytest's name of the running test (read only by libraries that scan the
# whole environment for their own prefixes: tqdm, networkx, fsspec).
RUNTIME_ONLY = {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "PYTEST_CURRENT_TEST"}
SERVERS_PER_ENV = 2  # alternated, so consecutive launches get different hash seeds
MAX_SERVERS = 6
START_TIMEOUT_S = 300


def forking_is_safe() -> bool:
    """Whether launches may be forked from preloaded interpreters here. Not on a machine with a
    GPU: an import that asks for the device count initializes the CUDA driver, which a forked
    child cannot use, and the GPU tests are few."""
    global _FORKING_IS_SAFE
    if _FORKING_IS_SAFE is None:
        import torch

        _FORKING_IS_SAFE = ENABLED and not torch.cuda.is_available()
    return _FORKING_IS_SAFE


_FORKING_IS_SAFE: bool | None = None


class ServerInfo:
    """A started server: its socket, the environment its imports saw, the variables they read
    and those they set."""

    def __init__(self, path: str, env: dict[str, str], read=(), set_by_imports=None):
        self.path, self.env, self.read = path, env, set(read)
        self.set_by_imports = set_by_imports or {}

    def accepts(self, env: dict[str, str]) -> bool:
        return not self.differences(env)

    def differences(self, env: dict[str, str]) -> set[str]:
        """The variables imports may read whose values differ from this server's."""
        keys = self.read | {
            k for k in env.keys() | self.env.keys() if k.startswith(IMPORT_TIME_PREFIXES)
        }
        return {
            k for k in keys - RUNTIME_ONLY
            if env.get(k) != self.env.get(k)
            # what the imports would set anyway (a torchrun that imported torch passes it on)
            and not (k in self.set_by_imports and env.get(k) in (None, self.set_by_imports[k]))
        }  # fmt: skip


class _Server:
    """One server process of this test process, started with ``env``."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.dir = tempfile.mkdtemp(prefix="zyg")  # short: a socket path has 107 bytes
        self.path = os.path.join(self.dir, "s")
        self.log = open(os.path.join(self.dir, "log"), "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote_server", self.path],
            env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log,
        )  # fmt: skip
        self.info: ServerInfo | None = None
        self.last_used = 0  # _clock's value at its latest launch
        self.children: weakref.WeakSet[subprocess.Popen] = weakref.WeakSet()

    def ready(self) -> ServerInfo | None:
        """The server once it has preloaded (waits for it); None if it failed to start."""
        if self.info is None and self.proc.stdout is not None:
            line = b""
            if select.select([self.proc.stdout], [], [], START_TIMEOUT_S)[0]:
                line = self.proc.stdout.readline()
            self.proc.stdout.close()
            self.proc.stdout = None
            if line:
                hello = json.loads(line)
                self.info = ServerInfo(self.path, hello["env"], hello["read"], hello["set"])
            else:
                self.log.seek(0)
                print(f"tests/zygote: a server failed to start:\n{self.log.read()[-3000:]}",
                      file=sys.stderr)  # fmt: skip
        return self.info

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_servers: list[_Server] = []
_clock = itertools.count(1)


def _server_for(env: dict[str, str]) -> _Server | None:
    """A server for ``env``: started at its first launch; a second one at its second launch,
    after which launches alternate between the two (different hash seeds)."""
    # A server not yet ready is matched by the environment it was started with.
    matching = [s for s in _servers if (s.info or ServerInfo("", s.env)).accepts(env)]
    if len(matching) < SERVERS_PER_ENV and all(s.last_used for s in matching):
        if len(_servers) >= MAX_SERVERS:
            _evict_idle()
        if len(_servers) < MAX_SERVERS:
            if not _servers:
                atexit.register(_close_all)
            _servers.append(_Server(env))
            matching.append(_servers[-1])
    if not matching:
        return None
    server = min(matching, key=lambda s: s.last_used)
    server.last_used = next(_clock)
    return server


def _evict_idle() -> None:
    """Close the least recently used server that has no child running."""
    for server in sorted(_servers, key=lambda s: s.last_used):
        if all(p.poll() is not None for p in server.children):
            server.close()
            _servers.remove(server)
            return


def _close_all() -> None:
    for server in _servers:
        server.close()


def _plan(args, kwargs) -> tuple[str, str, list[str], bool] | None:
    """(kind, target, arguments, unbuffered) of a ``python`` command line this module can fork,
    else None."""
    if isinstance(args, (str, bytes)) or not args:
        return None
    args = [os.fspath(a) for a in args]
    unusual = ("shell", "executable", "preexec_fn", "pass_fds", "user", "group", "extra_groups")
    if args[0] != sys.executable or any(kwargs.get(k) for k in unusual):
        return None
    if kwargs.get("umask", -1) != -1 or kwargs.get("close_fds", True) is not True:
        return None
    i, unbuffered = 1, False
    while i < len(args) and args[i] == "-u":
        i, unbuffered = i + 1, True
    if i >= len(args):
        return None
    if args[i] in ("-m", "-c") and i + 1 < len(args):
        return ("module" if args[i] == "-m" else "code"), args[i + 1], args[i + 2 :], unbuffered
    if args[i].startswith("-"):
        return None
    return "script", args[i], args[i + 1 :], unbuffered


def Popen(args, *, server: ServerInfo | None = None, **kwargs) -> subprocess.Popen:  # noqa: N802
    """``subprocess.Popen(args, **kwargs)``, forked from a preloaded server when it can be
    (``server``: that one, else this process's own)."""
    plan = _plan(args, kwargs) if forking_is_safe() else None
    if plan is None:
        _log("not a python command line it forks", args)
        return subprocess.Popen(args, **kwargs)
    env = {k: os.fspath(v) for k, v in (kwargs.get("env") or os.environ).items()}
    owner = _server_for(env) if server is None else None
    if owner is not None:
        server = owner.ready()
    if server is None or not server.accepts(env):
        candidates = [server] if server else [s.info for s in _servers if s.info]
        differ = sorted({k for info in candidates for k in info.differences(env)})
        _log(f"no server for its environment (differs in {', '.join(differ)})", args)
        return subprocess.Popen(args, **kwargs)
    _log(f"forked by {server.path}", args)
    child = _ForkedPopen(args, server, plan, **kwargs)
    if owner is not None:
        owner.children.add(child)  # (a server with a child running is not evicted)
    return child


def _log(what: str, args) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(f"{os.getpid()} {what}: {' '.join(map(str, args))[:200]}\n")


def run(args, *, input=None, capture_output=False, timeout=None, check=False, **kwargs):  # noqa: A002
    """``subprocess.run`` over :func:`Popen`."""
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with Popen(args, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except BaseException:
            process.kill()
            process.wait()
            raise
        code = process.poll()
    if check and code:
        raise subprocess.CalledProcessError(code, process.args, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(process.args, code, stdout, stderr)


class _ForkedPopen(subprocess.Popen):
    """A Popen whose child is forked by a server; its exit status comes from that server."""

    def __init__(self, args, server: ServerInfo, plan, **kwargs):
        self._server, self._plan = server, plan
        self._conn: socket.socket | None = None
        self._inbox = b""
        super().__init__(args, **kwargs)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env,
                       startupinfo, creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite,
                       errread, errwrite, *rest):  # fmt: skip
        kind, target, arguments, unbuffered = self._plan
        start_new_session = rest[5]  # (restore_signals, gid, gids, uid, umask, this, group)
        request = {
            "kind": kind, "target": target, "args": arguments, "unbuffered": unbuffered,
            "cwd": os.path.abspath(os.fspath(cwd) if cwd is not None else os.getcwd()),
            "env": {os.fsdecode(k): os.fsdecode(v) for k, v in (env or os.environ).items()},
            "new_session": bool(start_new_session),
        }  # fmt: skip
        fds = [p2cread, c2pwrite, errwrite]
        fds = [fd if fd != -1 else default for fd, default in zip(fds, (0, 1, 2))]
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(self._server.path)
            socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], fds)
            self._conn = conn
            self.pid = self._message(block=True)["pid"]
            self._child_created = True
        finally:
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)

    def _message(self, block: bool) -> dict | None:
        """The server's next line, or None (not blocking and none yet)."""
        while b"\n" not in self._inbox:
            if not block and not select.select([self._conn], [], [], 0)[0]:
                return None
            part = self._conn.recv(4096)
            if not part:  # the server died: report the child as lost
                return {"pid": -1, "status": 255 << 8}
            self._inbox += part
        line, self._inbox = self._inbox.split(b"\n", 1)
        return json.loads(line)

    def _try_wait(self, wait_flags):
        message = self._message(block=not wait_flags & os.WNOHANG)
        if message is None:
            return 0, 0
        self._conn.close()
        return self.pid, message["status"]

    def _internal_poll(self, _deadstate=None, **_):
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                if self.returncode is None and self._conn.fileno() != -1:
                    pid, status = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(status)
            finally:
                self._waitpid_lock.release()
        return self.returncode
