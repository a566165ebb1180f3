"""Converters never write into an existing output: tools/convert_checkpoint.py refuses a non-empty
--save (a training directory, an earlier export) unless --overwrite, and with --overwrite the old
directory is replaced only once the new one is complete (SIGKILL before that keeps it whole)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from megatron_slm.checkpoint import KILL_HOOK_ENV, TRACKER
from tests import zygote
from tests.functional import hf_worker

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


def _convert(*argv, env: dict | None = None) -> tuple[int, str]:
    """Run the tool in its own session (killed whole when done); (exit status, stderr)."""
    cmd = [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), *map(str, argv)]
    full_env = {k: v for k, v in os.environ.items() if k != KILL_HOOK_ENV}
    full_env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, **(env or {}))
    proc = zygote.Popen(
        cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "convert_checkpoint: error:" in ln]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _tree(root) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    hf_worker.make_hf_model(str(root / "hf"), "llama", vocab_size=256)
    return root


def test_hf_to_megatron_refuses_a_training_directory(hf_model, tmp_path):
    """It used to save iteration 0 into --save and rewind the run's tracker to 0."""
    run = tmp_path / "run"
    (run / "iter_0000005").mkdir(parents=True)
    (run / "iter_0000005" / "megatron_slm.json").write_text("{}")
    (run / TRACKER).write_text("5")
    before = _tree(run)

    rc, err = _convert("hf-to-megatron", "--load", hf_model / "hf", "--save", run)
    assert rc == 2, err[-3000:]
    line = _error_line(err)
    assert str(run) in line and "--overwrite" in line and "iteration 5" in line, line
    assert _tree(run) == before

    rc, err = _convert("hf-to-megatron", "--load", hf_model / "hf", "--save", run, "--overwrite")
    assert rc == 0, err[-3000:]
    assert sorted(os.listdir(run)) == ["iter_0000000", TRACKER]
    assert (run / TRACKER).read_text() == "0"
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no staging directory left


def test_megatron_to_hf_replaces_stale_shards_only_when_complete(hf_model, tmp_path):
    ckpt = tmp_path / "ckpt"
    rc, err = _convert("hf-to-megatron", "--load", hf_model / "hf", "--save", ckpt)
    assert rc == 0, err[-3000:]
    out = tmp_path / "hf_out"
    rc, err = _convert("megatron-to-hf", "--load", ckpt, "--save", out, "--max-shard-size", "40KB")
    assert rc == 0, err[-3000:]
    sharded = _tree(out)
    assert sum(name.startswith("model-0") for name in sharded) > 1

    rc, err = _convert("megatron-to-hf", "--load", ckpt, "--save", out)
    assert rc == 2
    assert str(out) in _error_line(err) and "--overwrite" in _error_line(err)
    assert _tree(out) == sharded

    # killed with the new export complete but not yet in place: the old one is intact
    argv = ("megatron-to-hf", "--load", ckpt, "--save", out, "--overwrite")
    rc, err = _convert(*argv, env={KILL_HOOK_ENV: "publish:1"})
    assert rc == -signal.SIGKILL, err[-3000:]
    assert _tree(out) == sharded

    rc, err = _convert(*argv)
    assert rc == 0, err[-3000:]
    names = set(os.listdir(out))
    assert "model.safetensors" in names
    assert not any(n.startswith("model-0") for n in names), names  # no stale shard
    assert "model.safetensors.index.json" not in names
