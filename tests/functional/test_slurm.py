"""examples/pretrain_rho_7b.sh under a real (local, one-node) SLURM cluster: the tiny model on CPU
with 2 tasks, a checkpoint at the end (with OPTIMIZER=muon); SIGTERM mid-run saves and exits
cleanly; resubmitting the same job resumes from that checkpoint. examples/multi_round.sh as one
job, end to end."""

from __future__ import annotations

import os
import sys
import time

import pytest

from megatron_slm.checkpoint import iteration_dir, latest_iteration, read_metadata
from tests.functional import slurm_cluster
from tests.functional.pretrain_helpers import REPO, VOCAB_FLAG, make_null_corpus, read_steps

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = os.path.join(REPO, "examples", "pretrain_rho_7b.sh")
SBATCH_CPU = (
    "--nodes=1",
    "--ntasks=2",
    "--ntasks-per-node=2",
    "--cpus-per-task=1",
    "--gpus-per-node=0",
    "--time=15",
)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = slurm_cluster.available()
    if reason:
        pytest.skip(reason)
    cluster = slurm_cluster.LocalSlurm(str(tmp_path_factory.mktemp("slurm"))).start()
    yield cluster
    cluster.stop()


def _env(tmp_path, run_dir, iters, prefix):
    return {
        "REPO_DIR": REPO, "PYTHON": sys.executable, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1",
        "MODEL_PRESET": "tiny", "DEVICE": "cpu", "TP": "1", "PP": "1", "PRECISION": "fp32",
        "SEQUENCE_PARALLEL": "0",  # the script's other defaults: distributed optimizer, overlap
        "SEQ_LENGTH": "32", "MICRO_BATCH_SIZE": "2", "GLOBAL_BATCH_SIZE": "8",
        "TRAIN_ITERS": str(iters), "LR": "3e-3", "MIN_LR": "0", "LR_WARMUP_ITERS": "1",
        "TOKENIZER_TYPE": "NullTokenizer", "VOCAB_SIZE": str(VOCAB_FLAG), "TOKENIZER_MODEL": "none",
        "DATA_PATH": prefix, "SPLIT": "100,0,0", "EVAL_INTERVAL": "0", "LOG_INTERVAL": "1",
        "RUN_DIR": str(run_dir), "LOAD": "", "SAVE_INTERVAL": "1000",
        "SLM_RATIO": "0.7", "SLM_SELECT_MODE": "loss",
        "LOG_LOSS_FILE": str(run_dir / "steps.jsonl"),
    }  # fmt: skip


def _submit(slurm, tmp_path, env):
    out = str(tmp_path / "job-%j.out")
    return slurm.sbatch(SCRIPT, *SBATCH_CPU, f"--output={out}", env=env, cwd=REPO)


def _job_log(tmp_path, job):
    path = tmp_path / f"job-{job}.out"
    return path.read_text() if path.exists() else "(no output)"


def test_job_completes_with_checkpoint(slurm, tmp_path):
    prefix = make_null_corpus(str(tmp_path), "corpus", [40] * 64)
    held_out = make_null_corpus(str(tmp_path), "held_out", [7] * 64, seed=1)
    run = tmp_path / "run"
    env = _env(tmp_path, run, 6, prefix)
    # a validation corpus of its own; documents masked apart, no loss after an EOD token;
    # Muon (the script then leaves the distributed optimizer out; 2 ranks share its work)
    env.update(VALID_DATA_PATH=held_out, DOCUMENT_MASK="1", EVAL_INTERVAL="3", EVAL_ITERS="1",
               OPTIMIZER="muon")  # fmt: skip
    job = _submit(slurm, tmp_path, env)
    assert slurm.wait(job) == "COMPLETED", _job_log(tmp_path, job)
    assert latest_iteration(str(run / "checkpoints")) == 6
    layout = read_metadata(iteration_dir(str(run / "checkpoints"), 6))["optimizer_layout"]
    assert layout["optimizer"] == "muon" and not layout["distributed"]
    steps = read_steps(str(run / "steps.jsonl"))
    assert [s["iteration"] for s in steps] == list(range(1, 7))
    assert all(0.65 < s["selected_fraction"] < 0.75 for s in steps)
    assert "validation at iter 6" in _job_log(tmp_path, job)
    valid_tokens = [s["n_selected"] / s["selected_fraction"] for s in steps]
    assert min(valid_tokens) < 8 * 32 - 0.5  # a row held an EOD token: its prediction is masked


def test_sigterm_saves_and_resubmit_resumes(slurm, tmp_path):
    prefix = make_null_corpus(str(tmp_path), "corpus", [40] * 64)
    run = tmp_path / "run"
    # the distributed optimizer's state per parameter (the resubmission changes its buckets),
    # checkpoints written in the background, every 2 steps: the writers' helper processes exist
    # when the signal reaches every process of the step
    env = {
        **_env(tmp_path, run, 100_000, prefix),
        "FULLY_RESHARDABLE": "1",
        "EXTRA_ARGS": "--async-save",
        "SAVE_INTERVAL": "2",
    }
    job = _submit(slurm, tmp_path, env)
    log = run / "steps.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(read_steps(str(log))) >= 3):
        assert slurm.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), _job_log(tmp_path, job)
        time.sleep(0.5)
    slurm.signal(job, "TERM")
    assert slurm.wait(job) == "COMPLETED", _job_log(tmp_path, job)
    saved = latest_iteration(str(run / "checkpoints"))
    assert saved is not None and saved >= 3, _job_log(tmp_path, job)
    assert read_steps(str(log))[-1]["iteration"] == saved
    assert "signal SIGTERM" in _job_log(tmp_path, job)

    # Resubmitting the job resumes: the script loads its own latest checkpoint (here without
    # overlapped communication: one gradient bucket instead of several).
    job2 = _submit(
        slurm,
        tmp_path,
        {**env, "OVERLAP_COMM": "0", "EXTRA_ARGS": f"--async-save --exit-interval {saved + 2}"},
    )
    assert slurm.wait(job2) == "COMPLETED", _job_log(tmp_path, job2)
    steps = read_steps(str(log))
    resumed = [s["iteration"] for s in steps[saved:]]
    assert resumed == [saved + 1, saved + 2], _job_log(tmp_path, job2)
    assert latest_iteration(str(run / "checkpoints")) == saved + 2


def test_multi_round_script_under_slurm(slurm, tmp_path):
    """examples/multi_round.sh as one job (srun for training and scoring): round 1, every batch
    scored, half of them drawn as torch.multinomial(softmax(loss)) draws them, round 2 one step per
    drawn batch (which samples it consumes: test_multi_round.py); resubmitting the finished job (a
    requeue) redoes nothing."""
    import numpy as np
    import torch

    from megatron_slm.data.sample_list import read_batch_list, read_batch_losses

    prefix = make_null_corpus(str(tmp_path), "corpus", [40] * 400)
    run = tmp_path / "run"
    env = _env(tmp_path, run, 0, prefix)
    del env["TRAIN_ITERS"]
    env.update(
        ROUND1_ITERS="12", KEEP="0.5", TEMPERATURE="1.0", RESAMPLE_SEED="5", SLM_RATIO="",
        SCORE_BF16="0", SCORE_MICRO_BATCH_SIZE="4", SCORE_COMMIT_INTERVAL="2", LOG_LOSS_FILE="",
    )  # fmt: skip
    script = os.path.join(REPO, "examples", "multi_round.sh")
    out = str(tmp_path / "job-%j.out")
    job = slurm.sbatch(script, *SBATCH_CPU, f"--output={out}", env=env, cwd=REPO)
    assert slurm.wait(job) == "COMPLETED", _job_log(tmp_path, job)

    losses = read_batch_losses(str(run / "round1_batch_losses"))
    assert losses.records.shape == (12 * 8,) and np.isfinite(losses.sample_losses).all()
    p = torch.softmax(torch.tensor(losses.batch_losses(), dtype=torch.float64), dim=0)
    drawn = torch.multinomial(p, 6, replacement=False, generator=torch.Generator().manual_seed(5))
    blist = read_batch_list(str(run / "round2.idx"))
    assert blist.batches == drawn.tolist()
    assert latest_iteration(str(run / "round1" / "checkpoints")) == 12
    assert latest_iteration(str(run / "round2" / "checkpoints")) == 6

    before = {p: p.read_bytes() for p in (run / "round2.idx", run / "round1_batch_losses.bin")}
    job2 = slurm.sbatch(script, *SBATCH_CPU, f"--output={out}", env=env, cwd=REPO)
    assert slurm.wait(job2) == "COMPLETED", _job_log(tmp_path, job2)
    log = _job_log(tmp_path, job2)
    assert "== scoring" not in log and "== resampling" not in log, log
    assert all(p.read_bytes() == data for p, data in before.items())
    assert latest_iteration(str(run / "round2" / "checkpoints")) == 6
