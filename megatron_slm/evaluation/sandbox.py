"""Run model-written Python programs in a confined child process (tool-integrated evaluation).

The programs come from the model under evaluation, so this is a security boundary. Each program
gets a separate process (``sandbox_child.py`` confines itself, then ``exec``s the interpreter)
with CPU-time, wall-time, memory, file-size, process-count and output-size limits, a fresh
temporary working directory, an environment of a few fixed variables (nothing inherited: no
tokens, no paths), its own session, and on timeout or too much output it is killed with its
whole process group. As root (tests, CI, containers) it also runs as an unprivileged uid of its
own (``SANDBOX_UID_BASE`` + the launcher's pid: no two live programs share one, so one program's
processes never count against another's process limit) and gid nogroup, in new network, mount
and PID namespaces: no network interface but loopback,
every filesystem read-only except its fresh working directory, and the kernel kills
everything it started when it ends. docs/design.md ("The sandbox") says what is not protected.

    results = Sandbox(SandboxLimits(wall_seconds=5)).run_many(["print(1 + 1)"])
    results[0].status, results[0].stdout  # "ok", "2\\n"
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from megatron_slm.errors import ConfigError

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
NOBODY = 65534  # nobody / nogroup on Debian and Ubuntu
# A program's uid is this + its launcher's pid (< 2**22, Linux's largest pid_max): unused by any
# account, and unique among live programs, which RLIMIT_NPROC (counted per uid) needs.
SANDBOX_UID_BASE = 1 << 30


class SandboxError(RuntimeError):
    """The sandbox could not be set up (not the program's fault): evaluation must not go on
    unconfined."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits."""

    wall_seconds: float = 10.0
    """Wall-clock limit; the process group is killed when it passes."""
    cpu_seconds: int = 5
    """CPU-time limit (RLIMIT_CPU) of each process of the program."""
    memory_bytes: int = 1 << 30
    """Address-space limit (RLIMIT_AS) of each process; sympy and numpy fit in 1 GiB."""
    output_bytes: int = 64 << 10
    """stdout + stderr kept; past it the program is killed (status ``output-limit``)."""
    file_bytes: int = 16 << 20
    """Largest file the program may write (RLIMIT_FSIZE)."""
    processes: int = 16
    """Processes + threads of the sandbox uid (RLIMIT_NPROC; stops fork bombs, not as root)."""

    def __post_init__(self):
        for name in ("wall_seconds", "cpu_seconds", "memory_bytes", "output_bytes", "file_bytes"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"sandbox {name}={getattr(self, name)!r}: must be > 0")
        if self.processes < 1:
            raise ConfigError(f"sandbox processes={self.processes!r}: must be >= 1")


@dataclass(frozen=True)
class RunResult:
    """What one program did."""

    status: str
    """``ok`` (exit 0), ``error`` (non-zero exit), ``timeout`` (wall or CPU limit),
    ``killed`` (a signal, e.g. the memory limit's), ``output-limit``."""
    stdout: str
    stderr: str
    returncode: int | None
    isolated: bool
    """False when the network could not be cut off (unprivileged, no user namespaces)."""


def _untraversable_ancestor(path: str) -> str | None:
    """The first directory on the way to ``path`` that others cannot search (mode lacks o+x)."""
    parts = os.path.realpath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        d = os.sep.join(parts[:i])
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return d
    return None


def _exposures(python: str) -> list[tuple[str, list[str]]]:
    """For the dropped uid: ``(hidden dir, [interpreter trees inside it])`` to make reachable."""
    trees = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix)}
    trees.add(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    groups: dict[str, list[str]] = {}
    for tree in sorted(trees):
        hidden = _untraversable_ancestor(tree)
        if hidden is None:
            continue
        if hidden == tree:
            raise SandboxError(f"{tree}: not searchable by other users (chmod o+x it)")
        groups.setdefault(hidden, []).append(tree)
    return sorted(groups.items())


class Sandbox:
    """Runs programs one process each (``run``) or several at once (``run_many``)."""

    def __init__(
        self, limits: SandboxLimits | None = None, python: str | None = None, workers: int = 2
    ):
        self.limits = limits or SandboxLimits()
        self.python = python or sys.executable
        self.workers = max(1, workers)
        self.as_root = os.geteuid() == 0
        self._expose = _exposures(self.python) if self.as_root else []

    def run_many(self, programs: list[str]) -> list[RunResult]:
        if len(programs) <= 1 or self.workers == 1:
            return [self.run(p) for p in programs]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.run, programs))

    def run(self, program: str) -> RunResult:
        workdir = tempfile.mkdtemp(prefix="megatron-slm-sandbox-")
        try:
            return self._run(program, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _run(self, program: str, workdir: str) -> RunResult:
        lim = self.limits
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        home = workdir
        if self.as_root:
            os.chmod(workdir, 0o700)  # the launcher gives it to the program's uid
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "TMPDIR": home,
            "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1",  # BLAS thread pools would hit the process limit
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        status_r, status_w = os.pipe()
        cfg = dict(
            workdir=workdir,
            program=os.path.join(home, "program.py"),
            python=self.python,
            env=env,
            status_fd=status_w,
            expose=self._expose,
            uid_base=SANDBOX_UID_BASE,
            gid=NOBODY,
            cpu_seconds=int(lim.cpu_seconds),
            memory_bytes=int(lim.memory_bytes),
            file_bytes=int(lim.file_bytes),
            processes=int(lim.processes),
        )
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _CHILD, json.dumps(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=env,
                pass_fds=(status_w,),
                start_new_session=True,  # its own process group, killed as one
            )
        finally:
            os.close(status_w)
        try:
            status, out, err = self._collect(proc)
        finally:
            _kill_group(proc)  # not yet reaped, so its pid (the group id) cannot be reused
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        with os.fdopen(status_r, "rb") as f:
            setup = f.read().decode(errors="replace")
        if "E" in setup:
            raise SandboxError(f"sandbox setup failed: {setup.split('E', 1)[1]}")
        if status is None and not setup.endswith("ok"):
            raise SandboxError(f"sandbox launcher exited {proc.returncode} before the program")
        rc = proc.returncode
        if status is None:
            # As root the launcher exits 128 + signal for the program; otherwise rc is -signal.
            sig = -rc if rc < 0 else (rc - 128 if self.as_root and rc > 128 else 0)
            if sig == signal.SIGXCPU:
                status = "timeout"  # the CPU limit
            elif sig:
                status = "killed"  # SIGKILL: the CPU hard limit or the kernel's OOM killer
            else:
                status = "ok" if rc == 0 else "error"
        decode = lambda b: b.decode("utf-8", errors="replace")  # noqa: E731
        return RunResult(status, decode(out), decode(err), rc, "n" not in setup)

    def _collect(self, proc) -> tuple[str | None, bytes, bytes]:
        """Read stdout and stderr until both close, the wall limit or the output limit."""
        lim = self.limits
        deadline = time.monotonic() + lim.wall_seconds
        bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        sel = selectors.DefaultSelector()
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        status = None
        try:
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    status = "timeout"
                    break
                for key, _ in sel.select(timeout=left):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    bufs[key.fd] += chunk
                if sum(map(len, bufs.values())) > lim.output_bytes:
                    status = "output-limit"
                    break
            while status is None and not _exited(proc):
                if time.monotonic() > deadline:
                    status = "timeout"
                time.sleep(0.002)
        finally:
            sel.close()
        out, err = bufs[proc.stdout.fileno()], bufs[proc.stderr.fileno()]
        cap = lim.output_bytes
        return status, bytes(out[:cap]), bytes(err[: max(0, cap - len(out))])


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the launcher has exited, without reaping it (``WNOWAIT``)."""
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (as root, its death also kills the program's PID
    namespace through PR_SET_PDEATHSIG)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
