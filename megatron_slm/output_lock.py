"""One writer per output: an exclusive ``flock`` on a lock file next to the output.

A long-running writer (the offline scorer writing ``<prefix>_refloss.*``, ...) holds
``OutputLock("<prefix>_refloss.lock", "the reference-loss sidecar of <prefix>")`` for its whole
run, so a second job on the same output (double submission, overlapping SLURM requeue, an orphaned
worker) fails at once instead of racing. The lock is ``flock(LOCK_EX | LOCK_NB)`` on an fd kept
open: the kernel drops it when the last process holding that open file dies (SIGKILL included),
so a lock file left by a killed job is taken over atomically, without guessing from pids. Forked
children share the open file, so the lock lasts until the holder *and* its forked workers exit.

Shared filesystems: we rely on ``flock`` being exclusive across every node that writes the output.
That holds on local Linux filesystems and on NFS (v4, or v3 with NLM: Linux emulates ``flock``
with POSIX locks there) and Lustre mounted with ``-o flock``; Lustre with ``localflock`` only
excludes writers on the same node. A filesystem without locks fails loudly (``OSError``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

from megatron_slm.errors import UserError


class OutputLockedError(UserError):
    """The output is locked by another process (or another ``OutputLock`` in this one)."""


def _holder_info() -> dict:
    return {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "argv": list(sys.argv),
    }


def format_holder(info: dict | None) -> str:
    """``pid 12 on node3 since 2026-01-01T00:00:00Z (SLURM job 7), command: ...``."""
    if not info:
        return "holder not recorded yet"
    text = f"pid {info.get('pid')} on {info.get('hostname')} since {info.get('started')} UTC"
    if info.get("slurm_job_id"):
        text += f" (SLURM job {info['slurm_job_id']})"
    if info.get("argv"):
        text += f", command: {' '.join(map(str, info['argv']))}"
    return text


class OutputLock:
    """Exclusive, non-blocking lock of one output, as a context manager or ``acquire``/``release``.

    The lock file at ``path`` holds the holder's description (JSON: hostname, pid, start time UTC,
    ``sys.argv``, ``SLURM_JOB_ID``), rewritten by every new holder; it is mode 0600 and never
    opened through a symlink. It is never deleted: deleting it would let a waiting process lock
    the old inode while a newcomer creates and locks a new one.
    ``what`` names the output in error messages.
    """

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputLock:
        """Take the lock or raise ``OutputLockedError`` at once (never waits)."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this OutputLock")
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_info(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputLockedError(
                        f"{self.what} is being written by another job: {format_holder(holder)} "
                        f"(lock file {self.path}); wait for it to finish or stop it"
                    ) from None
                raise OSError(
                    e.errno,
                    f"cannot lock {self.path} ({e.strerror}); does this filesystem support "
                    "flock? (Lustre: mount with -o flock)",
                ) from e
            # Someone removed or replaced the file between our open and flock: our lock is on an
            # orphaned inode that a newcomer would not see. Start again on the current file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        data = json.dumps(_holder_info()).encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays, emptied). A no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # still locked here, so no newer holder's info is erased
        finally:
            os.close(fd)  # closing the last fd of the open file releases the flock

    def _open(self) -> int:
        # O_NOFOLLOW: a symlink planted at the lock path must not make us create, truncate or
        # write the file it points to. 0600: the holder record names the command line.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(
                    f"the lock file of {self.what} is a symbolic link, not followed",
                    subject=self.path,
                    hint="remove the link; a lock file must be a regular file",
                ) from None
            if not isinstance(e, FileNotFoundError):
                raise
            directory = os.path.dirname(os.path.abspath(self.path))
            raise FileNotFoundError(
                errno.ENOENT,
                f"cannot create the lock file of {self.what}: directory {directory} does not exist",
                self.path,
            ) from None
        try:
            os.fchmod(fd, 0o600)  # a lock file created by an older version was 0644
        except PermissionError:  # another user's file that we may write: leave its mode
            pass
        return fd

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


def _read_info(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None


def read_holder(path: str) -> dict | None:
    """The holder description recorded in lock file ``path`` (None if empty or unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_info(fd)
    finally:
        os.close(fd)
