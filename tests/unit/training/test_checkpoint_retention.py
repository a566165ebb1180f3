"""Megatron-LM's flags for long runs' checkpoints and bad batches, in the real ``Trainer``.

``--save-retain-interval``: each save deletes the previous latest checkpoint unless its step is
a multiple of the interval. ``--non-persistent-save-interval``: checkpoints in
``<save>/non_persistent`` at the other steps, that directory keeping only its newest; a run that
dies resumes from it when it is newer than ``--load``'s latest, and ends bitwise where an
uninterrupted run ends. ``--iterations-to-skip``: the step's global batch is dropped (the next
step reads the batch after it, as the sample record of a run without the flag shows), the
weights and the learning-rate schedule stay.
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime

import pytest
import torch

from megatron_slm.checkpoint import drop_superseded, iteration_dir, latest_iteration
from megatron_slm.training.progress_log import cumulative_start
from tests.dist_helpers import run_distributed
from tests.functional.pretrain_helpers import (
    OVERLAP_ARGS,
    close_trainer,
    cpu_trainer,
    make_null_corpus,
    tiny_args,
)

SKIPPED = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_null_corpus(str(tmp_path_factory.mktemp("retention")), "c", [30] * 80)


def _weights(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.chunks[0].parameters()]).clone()


def _adam(trainer):
    """Each parameter's Adam step count and first moment."""
    from megatron_slm.optimizer_state import optimizer_parts

    states = [s for p in optimizer_parts(trainer.optimizer) for s in p.optimizer.state.values()]
    return [(float(s["step"]), s["exp_avg"].clone()) for s in states]


def _same_adam(a, b) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def _iterations(root):
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(n[5:]) for n in names if n.startswith("iter_") and n[5:].isdigit())


def _records(path):
    with open(path) as f:
        return {r["iteration"]: r["samples"] for r in map(json.loads, f)}


def _spy_saves(trainer) -> list:
    """(iteration, whether inside ``params_gathered``) of each of ``trainer``'s saves: with
    --overlap-param-gather and several data-parallel ranks a save outside it would write the
    previous step's parameters."""
    depth, saves = [0], []
    gathered, save = trainer.params_gathered, trainer.save

    @contextlib.contextmanager
    def counted():
        with gathered():
            depth[0] += 1
            try:
                yield
            finally:
                depth[0] -= 1

    def recorded(non_persistent=False):
        saves.append((trainer.iteration, depth[0] > 0))
        save(non_persistent)

    trainer.params_gathered, trainer.save = counted, recorded
    return saves


def _worker(rank, world, prefix, root):
    # (the parameters' all-gather overlapped with the next forward: a save must gather first)
    common = tiny_args(prefix, f"{root}/log.jsonl", 8, "--num-workers", 0, *OVERLAP_ARGS)
    out = {}

    plain = cpu_trainer([*common, "--train-samples-record", f"{root}/plain.jsonl"])
    for _ in range(SKIPPED + 1):
        plain.advance()
    close_trainer(plain)

    skip = ("--iterations-to-skip", SKIPPED)
    straight = cpu_trainer([*common, *skip, "--train-samples-record", f"{root}/skip.jsonl"])
    for _ in range(SKIPPED - 1):
        straight.advance()
    before = (_weights(straight), straight.scheduler.num_steps, _adam(straight))
    straight.advance()  # the skipped iteration
    out["skip"] = {
        "iteration": straight.iteration,
        "consumed": straight.batches.consumed_samples,
        "weights_kept": torch.equal(before[0], _weights(straight)),
        "schedule_kept": before[1] == straight.scheduler.num_steps,
        "adam_kept": bool(before[2]) and _same_adam(before[2], _adam(straight)),
    }
    while straight.iteration < 8:
        straight.advance()
    out["straight"] = _weights(straight)
    close_trainer(straight)

    save = f"{root}/ckpt"
    flags = (*skip, "--save", save, "--save-interval", 2, "--save-retain-interval", 4,
             "--non-persistent-save-interval", 1, "--log-progress")  # fmt: skip
    crashed = cpu_trainer([*common, *flags])
    out["saves_gathered"] = _spy_saves(crashed)
    for _ in range(7):
        crashed.advance()
    close_trainer(crashed)  # dies after step 7: no exit save
    out["after_crash"] = (_iterations(save), _iterations(f"{save}/non_persistent"))

    resumed = cpu_trainer([*common, *flags, "--load", save])
    out["resumed_at"] = (resumed.iteration, resumed.batches.consumed_samples)
    resumed.advance()  # step 8: a persistent save
    out["resumed"] = _weights(resumed)
    close_trainer(resumed)
    out["at_end"] = (_iterations(save), _iterations(f"{save}/non_persistent"))
    out["flops_per_sample"] = resumed.arch.flops_per_token(32) * 32
    return out


def test_retention_non_persistent_resume_and_skipped_iterations(corpus, tmp_path):
    out = run_distributed(_worker, 1, corpus, str(tmp_path))[0]
    skip = out["skip"]
    assert (skip["iteration"], skip["consumed"]) == (SKIPPED, SKIPPED * 8)
    assert skip["weights_kept"] and skip["schedule_kept"] and skip["adam_kept"]
    plain, skipped = _records(tmp_path / "plain.jsonl"), _records(tmp_path / "skip.jsonl")
    assert sorted(skipped) == [i for i in range(1, 9) if i != SKIPPED]
    assert skipped[SKIPPED + 1] == plain[SKIPPED + 1] and skipped[1] == plain[1]
    # persistent saves at 2, 4, 6 (2 deleted by 4: not a multiple of 4); non-persistent at the
    # other steps, each replacing the one before
    assert out["after_crash"] == ([4, 6], [7])
    assert out["saves_gathered"] == [(i, True) for i in range(1, 8)]
    assert out["resumed_at"] == (7, 56)  # the non-persistent checkpoint: newer than --load's 6
    assert torch.equal(out["resumed"], out["straight"])
    assert out["at_end"] == ([4, 8], [7])  # 8 superseded 6
    # --log-progress: Megatron-LM's progress.txt, persistent checkpoints only
    with open(tmp_path / "ckpt" / "progress.txt") as f:
        lines = [line.rstrip("\n").split("\t") for line in f]
    assert [" ".join(t[3:5]) for t in lines] == [
        "Starting job", "Saved checkpoint Iteration: 2", "Saved checkpoint Iteration: 4",
        "Deleted checkpoint Iteration: 2", "Saved checkpoint Iteration: 6",
        "Starting job", "Saved checkpoint Iteration: 8", "Deleted checkpoint Iteration: 6",
    ]  # fmt: skip
    assert all(t[2] == "# GPUs: 1" for t in lines)
    last = lines[6]
    assert last[7] == f"Floating-point operations: {64 * out['flops_per_sample']:.2e}"
    assert last[8] == "Tokens (in billions): 0.00"
    assert last[5].startswith("Job throughput: ") and last[5].endswith(" TFLOP/s/GPU")


def test_cumulative_throughput_counts_from_the_first_job_of_this_size(tmp_path):
    """Megatron-LM's rule: the earliest start of the last unbroken run of jobs with this many
    devices, and the operations of the last checkpoint saved before it."""
    path = tmp_path / "progress.txt"

    def line(stamp, gpus, *message):
        return "\t".join([f"2026-12-0{stamp}", "Job ID: 7", f"# GPUs: {gpus}", *message]) + "\n"

    def saved(flops):
        return ("Saved checkpoint", "Iteration: 1", "Job throughput: 1.0 TFLOP/s/GPU",
                "Cumulative throughput: 1.0 TFLOP/s/GPU", f"Floating-point operations: {flops:.2e}",
                "Tokens (in billions): 0.10")  # fmt: skip

    path.write_text(
        line("1 00:00:00", 8, "Starting job") + line("1 01:00:00", 8, *saved(1e18))
        + line("2 00:00:00", 16, "Starting job") + line("2 01:00:00", 16, *saved(3e18))
        + line("3 00:00:00", 8, "Starting job") + line("3 01:00:00", 8, *saved(4e18))
        + line("4 00:00:00", 8, "Starting job") + "a line of another format\n"
    )  # fmt: skip
    start, flops = cumulative_start(str(path), 8)
    assert (start, flops) == (datetime(2026, 12, 3), 3e18)  # (the 16-GPU job broke the run)
    assert cumulative_start(str(path), 16) is None
    assert cumulative_start(str(tmp_path / "none.txt"), 8) is None


def test_drop_superseded_is_crash_safe_and_spares_links(tmp_path):
    """A half-removed directory of an earlier crash (``iter_N.deleting``) goes, a directory
    being written (``.partial``) and a symbolic link stay; only an older latest is dropped."""
    root = str(tmp_path)
    for i in (2, 4, 6):
        os.makedirs(iteration_dir(root, i))
    os.makedirs(iteration_dir(root, 1) + ".deleting")
    os.makedirs(iteration_dir(root, 9) + ".partial")
    os.symlink(tmp_path / "elsewhere", iteration_dir(root, 3))
    assert drop_superseded(root, 6, previous=4, retain_interval=4) == []  # a multiple: kept
    assert drop_superseded(root, 4, previous=6, retain_interval=4) == []  # newer: kept
    assert drop_superseded(root, 6, previous=2, retain_interval=4) == [2]
    assert sorted(os.listdir(root)) == ["iter_0000003", "iter_0000004", "iter_0000006",
                                        "iter_0000009.partial"]  # fmt: skip
    assert drop_superseded(root, 6, previous=None, keep_latest_only=True) == [4]
    assert sorted(os.listdir(root)) == ["iter_0000003", "iter_0000006", "iter_0000009.partial"]
    assert latest_iteration(root) is None  # (no tracker: only save_checkpoint writes it)
