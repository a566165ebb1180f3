"""The sandbox's launcher: run as ``python -I -S sandbox_child.py CONFIG_JSON`` by
:mod:`megatron_slm.evaluation.sandbox`, it confines itself, then ``exec``s the interpreter on the
model-written program. Standard library only and no package import (it starts with ``-S``, in a
few milliseconds, once per program).

As root: new network, mount, PID, IPC and UTS namespaces; in the mount namespace every
filesystem is remounted read-only, the fresh working directory is bound onto itself (the only
writable place), a fresh ``/proc`` is mounted, and a directory the unprivileged user cannot
traverse on the way to the interpreter (``/root`` for a pyenv Python) is covered by an empty
read-only tmpfs holding just the interpreter's tree. The program then runs under a uid of its
own (the base + this launcher's pid) and gid nogroup with the resource limits, as PID 2 of the new
PID namespace under a waiting PID 1 that dies with the launcher (when PID 1 dies, the kernel kills
everything in the namespace).
Not root: the limits, and new user + network namespaces when the kernel allows unprivileged
ones (else the network stays reachable).

Setup status goes to the parent on a pipe (``status_fd``, close-on-exec): ``"ok"`` just before
``exec``, or ``"E<message>"``; the program's own exit code can therefore never fake a setup
failure.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 32, 1024, 2048, 4096, 8192, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
PR_SET_PDEATHSIG = 1
_OPT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    ret = _libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(ret, f"mount {target}")


def _mounts() -> list[tuple[str, int, bool]]:
    """(mount point, per-mount flags to keep, read-only) of this namespace, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # "\040" for spaces
            opts = fields[5].split(",")
            keep = sum(_OPT_FLAGS.get(o, 0) for o in opts)
            out.append((point, keep, "ro" in opts))
    return out


def _read_only_everywhere() -> None:
    """Remount every mount read-only in this (private) mount namespace, except the kernel's
    pseudo filesystems (/proc, /sys: not writable by the dropped uid anyway) and /dev itself
    (device nodes; /dev/shm and /dev/mqueue are separate mounts and do become read-only)."""
    for point, keep, ro in _mounts():
        if ro or point == "/dev" or point.startswith(("/proc", "/sys")):
            continue
        if not os.path.isdir(point):
            continue
        _mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | keep)


def _expose(hidden: str, inners: list[str], staging: str) -> None:
    """Cover ``hidden`` (a directory the dropped uid cannot traverse) with an empty tmpfs and
    put back only ``inners`` (read-only), so the interpreter stays reachable and nothing else of
    ``hidden`` is."""
    stages = []
    for i, inner in enumerate(inners):
        stage = f"{staging}{i}"
        os.mkdir(stage)
        _mount(inner, stage, None, MS_BIND | MS_REC)
        stages.append(stage)
    _mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
    for inner, stage in zip(inners, stages):
        os.makedirs(inner, mode=0o755, exist_ok=True)
        _mount(stage, inner, None, MS_MOVE)
        os.rmdir(stage)
    _mount(None, hidden, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _limits(cfg: dict) -> None:
    def both(res, value):
        resource.setrlimit(res, (value, value))

    # CPU: soft limit sends SIGXCPU, the hard one a second later SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_seconds"], cfg["cpu_seconds"] + 1))
    both(resource.RLIMIT_AS, cfg["memory_bytes"])
    both(resource.RLIMIT_FSIZE, cfg["file_bytes"])
    both(resource.RLIMIT_NPROC, cfg["processes"])
    both(resource.RLIMIT_NOFILE, 64)
    both(resource.RLIMIT_CORE, 0)


def _root_child(cfg: dict, uid: int) -> None:
    """PID 1 of the new PID namespace: mounts, limits, drop privileges to ``uid``."""
    workdir = cfg["workdir"]
    os.chown(workdir, uid, cfg["gid"])
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    for i, (hidden, inners) in enumerate(cfg["expose"]):
        _expose(hidden, inners, os.path.join(workdir, f".expose{i}-"))
    _read_only_everywhere()
    # The working directory, bound onto itself, is the one writable mount. (Not bound over /tmp:
    # the interpreter or its packages may live under /tmp, e.g. a CI checkout's .venv.)
    _mount(workdir, workdir, None, MS_BIND)
    _mount(None, workdir, None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV)
    try:  # this namespace's processes only; best effort (a container may refuse a new proc)
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:
        pass
    os.chdir(workdir)
    _limits(cfg)
    os.setgroups([])
    os.setgid(cfg["gid"])
    os.setuid(uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise SetupError("could not drop root")
    # Set after the uid change (which clears it): die with the launcher, and so end the namespace.
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")


def _exec(cfg: dict, status_fd: int) -> None:
    os.write(status_fd, b"ok")
    os.execve(cfg["python"], [cfg["python"], "-I", cfg["program"]], cfg["env"])


def _wait_and_exit() -> None:
    """Wait for the (only) child and exit with its status, a signal as 128 + signal."""
    _, status = os.wait()
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    os._exit(128 + sig if sig else os.WEXITSTATUS(status))


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)
    try:
        if os.geteuid() == 0:
            flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
            _check(_libc.unshare(flags), "unshare (needs CAP_SYS_ADMIN)")
            # This launcher's pid (unique while the program lives: it outlives it) names the uid.
            uid = cfg["uid_base"] + os.getpid()
            pid = os.fork()
            if pid == 0:
                try:
                    _root_child(cfg, uid)
                    # The kernel ignores default-action signals (SIGXCPU of the CPU limit) sent
                    # to a namespace's PID 1, so the program runs as PID 2 under a waiting PID 1.
                    if os.fork() == 0:
                        _exec(cfg, status_fd)
                    os.close(status_fd)
                    _wait_and_exit()
                except BaseException as e:  # noqa: BLE001 - reported to the parent, then exit
                    os.write(status_fd, b"E" + f"{type(e).__name__}: {e}".encode())
                    os._exit(125)
            os.close(status_fd)
            _wait_and_exit()
        _limits(cfg)
        # Unprivileged: a network namespace needs a user namespace; without one, no isolation.
        if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
            os.write(status_fd, b"n")  # "network not isolated", then carry on
        _exec(cfg, status_fd)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        os.write(status_fd, b"E" + f"{type(e).__name__}: {e}".encode())
        os._exit(125)


if __name__ == "__main__":
    main()
