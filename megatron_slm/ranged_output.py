"""A fixed-size output file written range by range by a resumable job, then published atomically.

The one writer behind the reference-loss sidecar (``data/sidecar.py``) and the batch-losses file
(``data/sample_list.py``). On disk, next to the final ``<name>.bin`` / ``<name>.json``:

- ``<name>.bin.partial``: the values, preallocated (sparse) to the final size;
- ``<name>.json.partial``: the metadata the job started with (a resume must match it);
- ``<name>.ranges/<first>-<end>``: one empty marker per written range of units (documents,
  samples: whatever the caller resumes by).

A range's bytes are fsync'd before its marker is created, and the marker and its directory are
fsync'd after, so a crash at any point never records a range that was not written. Publication
removes the old metadata first (readers see nothing rather than old metadata over new values),
renames the values in, and writes the metadata last: a published ``.json`` always describes the
``.bin`` beside it.
"""

from __future__ import annotations

import json
import os
import shutil

from megatron_slm.atomic_io import fsync_dir, write_json_atomic


class RangedOutput:
    """The partial state of one output file.

    Args:
        bin_path: the final values file (``<name>.bin``).
        json_path: the final metadata file (``<name>.json``).
        nbytes: the values file's size.
        units: how many units (the caller's resume granularity) the file holds.
    """

    def __init__(self, bin_path: str, json_path: str, nbytes: int, units: int) -> None:
        self.bin_path, self.json_path = bin_path, json_path
        self.partial_bin = bin_path + ".partial"
        self.partial_json = json_path + ".partial"
        self.ranges_dir = bin_path.removesuffix(".bin") + ".ranges"
        self.nbytes, self.units = nbytes, units
        self._fd: int | None = None

    # -- state -----------------------------------------------------------------------------------
    def partial_exists(self) -> bool:
        return os.path.exists(self.partial_json) and os.path.exists(self.partial_bin)

    def partial_metadata(self):
        """The metadata a partial run started with (raises ``OSError``/``ValueError`` if it is
        unreadable: the caller names the file in its own error)."""
        with open(self.partial_json, encoding="utf-8") as f:
            return json.load(f)

    def partial_size_ok(self) -> bool:
        return os.path.getsize(self.partial_bin) == self.nbytes

    def create(self, metadata: dict) -> None:
        """Start fresh: discard any partial state, preallocate the values, record the metadata."""
        self.close()
        self.discard()
        os.makedirs(self.ranges_dir)
        with open(self.partial_bin, "wb") as f:
            f.truncate(self.nbytes)  # sparse; every byte is written before publication
        write_json_atomic(self.partial_json, metadata)

    def discard(self) -> None:
        """Remove the partial state (the published files are left alone)."""
        for path in (self.partial_bin, self.partial_json):
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(self.ranges_dir, ignore_errors=True)

    # -- ranges ----------------------------------------------------------------------------------
    def completed_ranges(self) -> list[tuple[int, int]]:
        """Merged, sorted ``[first, end)`` unit ranges written so far (this or earlier runs)."""
        raw = []
        for name in os.listdir(self.ranges_dir) if os.path.isdir(self.ranges_dir) else []:
            a, _, b = name.partition("-")
            if a.isdigit() and b.isdigit():
                raw.append((int(a), int(b)))
        merged: list[tuple[int, int]] = []
        for a, b in sorted(raw):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return merged

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Sorted ``[first, end)`` unit ranges not yet written."""
        missing, pos = [], 0
        for a, b in self.completed_ranges():
            if a > pos:
                missing.append((pos, a))
            pos = max(pos, b)
        if pos < self.units:
            missing.append((pos, self.units))
        return missing

    def write(self, first: int, end: int, data: bytes, offset: int) -> None:
        """Write units ``first .. end - 1``, whose bytes ``data`` start at byte ``offset``, then
        record the range: the bytes are on disk before the marker exists."""
        if (
            not 0 <= first <= end <= self.units
            or not 0 <= offset <= offset + len(data) <= self.nbytes
        ):
            raise ValueError(f"range [{first}, {end}) of {self.units} units at byte {offset}")
        if self._fd is None:
            self._fd = os.open(self.partial_bin, os.O_RDWR)
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written
        os.fsync(self._fd)
        marker = os.path.join(self.ranges_dir, f"{first}-{end}")
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.ranges_dir)

    # -- publication -----------------------------------------------------------------------------
    def publish(self, metadata: dict) -> None:
        """Publish the values and then ``metadata`` (the caller checked ``missing_ranges``)."""
        if self._fd is not None:
            os.fsync(self._fd)
        self.close()
        if os.path.exists(self.json_path):
            os.remove(self.json_path)  # unpublish the old file before replacing its values
        os.replace(self.partial_bin, self.bin_path)
        write_json_atomic(self.json_path, metadata)
        self.discard()

    def close(self) -> None:
        """Close the values file (the partial state stays on disk for a later resume)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()
