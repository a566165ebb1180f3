"""Atomic file writes: a temporary file in the same directory, fsync, then ``os.replace`` and an
fsync of the directory, so a crash leaves either the old file or the new one, never a torn one;
and the sha256 of a file, by which outputs record (and later check) the files they were made from.

The temporary file is created by ``tempfile.mkstemp`` (``O_CREAT | O_EXCL``, a random name): a
symlink or file planted at a predictable name is never followed or truncated. Its name is
``.<name>.<random>.tmp`` next to ``<name>``; :func:`is_temp_of` recognises exactly those names, so
cleanup code removes its own stale temporaries and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile

_TEMP_SUFFIX = ".tmp"


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def is_temp_of(path: str, candidate: str) -> bool:
    """Whether ``candidate`` is a temporary file that :func:`write_bytes_atomic` creates for
    ``path`` (same directory, ``.<name>.<random>.tmp``; mkstemp's random part has no dot)."""
    if os.path.dirname(os.path.abspath(candidate)) != os.path.dirname(os.path.abspath(path)):
        return False
    pattern = re.escape(_temp_prefix(path)) + r"[^./]+" + re.escape(_TEMP_SUFFIX)
    return re.fullmatch(pattern, os.path.basename(candidate)) is not None


def temp_files_of(path: str) -> list[str]:
    """The stale temporaries of ``path`` (left by a writer that crashed before its rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [
        os.path.join(directory, n) for n in names if is_temp_of(path, os.path.join(directory, n))
    ]


def current_umask() -> int:
    # Linux reports it without changing it; os.umask() would set it process-wide for a moment.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=_TEMP_SUFFIX, dir=directory)
    try:
        # mkstemp creates 0600; the output gets the mode a plain open() would have given it
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make the rename durable. Some filesystems cannot fsync a directory (EINVAL): the rename
    is still atomic there, only its durability is the filesystem's."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def write_jsonl_atomic(path: str, records) -> None:
    """One JSON object per line, unicode kept as is."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
