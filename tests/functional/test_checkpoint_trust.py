"""Checkpoints on disk: a resume never unpickles code from the RNG files, and re-saving an
iteration never leaves the tracker naming a missing directory (SIGKILL at each step of the swap).
Real ``python -m megatron_slm.pretrain`` runs on a tiny model, CPU."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys

import pytest
import torch

from megatron_slm.checkpoint import KILL_HOOK_ENV, TRACKER, iteration_dir, load_rng_file
from tests import zygote
from tests.functional.pretrain_helpers import (
    REPO,
    make_null_corpus,
    read_steps,
    run_pretrain,
    tiny_args,
)

pytestmark = pytest.mark.slow


# The checkpoint's run trained 3 steps; resuming for 4 decays over 4 (this run's schedule).
LONGER = ("--override-opt-param-scheduler",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A corpus and a checkpoint of 3 iterations (and the log of those steps)."""
    root = tmp_path_factory.mktemp("ckpt_trust")
    prefix = make_null_corpus(str(root), "c", [31] * 32)
    ckpt = str(root / "ckpt")
    run_pretrain(tiny_args(prefix, str(root / "a.jsonl"), 3, "--save", ckpt, "--seed", 3))
    return prefix, ckpt


class _PlantMarker:
    """Unpickling this creates ``path``: what an attacker's checkpoint would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _copy_checkpoint(src: str, dst: str) -> str:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_planted_pickle_in_rng_file_is_refused_without_running(trained, tmp_path):
    prefix, ckpt = trained
    ckpt = _copy_checkpoint(ckpt, str(tmp_path / "ckpt"))
    rng_file = os.path.join(iteration_dir(ckpt, 3), "rng", "rank_00000.pt")
    good = load_rng_file(rng_file)  # what save_checkpoint wrote loads under weights_only
    assert isinstance(good["numpy"]["keys"], torch.Tensor) and good["numpy"]["keys"].numel() == 624
    marker = tmp_path / "marker"
    state = dict(good, python=_PlantMarker(str(marker)))
    torch.save(state, rng_file)

    proc = run_pretrain(
        tiny_args(prefix, str(tmp_path / "b.jsonl"), 4, "--load", ckpt, *LONGER), check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "pretrain: error:" in ln]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert rng_file in errors[0] and "refused" in errors[0], errors[0]
    assert "posix" in errors[0] or "builtins.open" in errors[0] or "GLOBAL" in errors[0]
    assert not marker.exists()
    # the same object through pickle (what weights_only=False did) does create the marker
    pickle.loads(pickle.dumps(_PlantMarker(str(marker)))).close()
    assert marker.exists()


def _run_killed(args, env: dict, log_path) -> tuple[int, str]:
    """Run the trainer in its own session, output to a file: the helper processes of a trainer
    killed by SIGKILL outlive it (and would hold a pipe open), so they are killed with it."""
    cmd = [sys.executable, "-m", "megatron_slm.pretrain", "--device", "cpu", *map(str, args)]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **env)
    with open(log_path, "w") as log:
        proc = zygote.Popen(cmd, env=full_env, stdout=log, stderr=log, start_new_session=True)
        try:
            rc = proc.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with open(log_path) as log:
        return rc, log.read()


def _tracked_dir(ckpt: str) -> str:
    with open(os.path.join(ckpt, TRACKER)) as f:
        return iteration_dir(ckpt, int(f.read()))


@pytest.mark.parametrize("point", ["swap", "swapped"])
def test_resave_killed_mid_swap_leaves_a_loadable_checkpoint(trained, tmp_path, point):
    """A second run saving iteration 3 into the same --save is killed at ``point``: the tracker
    still names a complete iteration directory (old or new), and a resume from it trains on."""
    prefix, ckpt = trained
    ckpt = _copy_checkpoint(ckpt, str(tmp_path / "ckpt"))
    args = tiny_args(prefix, str(tmp_path / "k.jsonl"), 3, "--save", ckpt, "--seed", 3)
    rc, log = _run_killed(args, {KILL_HOOK_ENV: f"{point}:1"}, tmp_path / "killed.log")
    assert rc == -signal.SIGKILL, log[-3000:]
    tracked = _tracked_dir(ckpt)
    assert os.path.isfile(os.path.join(tracked, "megatron_slm.json")), os.listdir(ckpt)
    assert os.path.isfile(os.path.join(tracked, "rng", "rank_00000.pt"))
    resumed = tmp_path / "r.jsonl"
    run_pretrain(tiny_args(prefix, str(resumed), 4, "--load", ckpt, "--seed", 3, *LONGER))
    assert [r["iteration"] for r in read_steps(str(resumed))] == [4]
    # a save that is not killed cleans what the killed one left
    run_pretrain(args)
    assert sorted(os.listdir(ckpt)) == ["iter_0000003", TRACKER]
