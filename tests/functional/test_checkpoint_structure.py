"""``--ckpt-assume-constant-structure`` (Megatron-LM's flag): the checkpoint writers kept across
saves, the sharding's integrity checked at the first save only (counted), and a checkpoint written
from the cached structure (with the distributed optimizer, its writing shared over two
data-parallel ranks) resumes to the steps of a run that never stopped. CPU, real processes."""

from __future__ import annotations

import pytest

from tests.dist_helpers import run_distributed
from tests.functional.pretrain_helpers import (
    close_trainer,
    cpu_trainer,
    make_null_corpus,
    read_steps,
    run_pretrain,
    tiny_args,
)

pytestmark = pytest.mark.slow
FLAGS = ("--use-distributed-optimizer", "--ckpt-assume-constant-structure")


def _saves_checked(rank, world, prefix, save, log):
    """Three steps, a checkpoint after each: how many saves checked the sharding's integrity."""
    import megatron.core.dist_checkpointing.state_dict_utils as utils

    checks, check = [], utils.validate_sharding_integrity
    utils.validate_sharding_integrity = lambda *a, **k: (checks.append(1), check(*a, **k))[1]
    trainer = cpu_trainer(
        tiny_args(prefix, log, 4, *FLAGS, "--save", save, "--save-interval", 1), world
    )
    for _ in range(3):
        assert trainer.advance() is None
    close_trainer(trainer)
    return len(checks)


def test_cached_structure_checks_once_and_resumes_exactly(tmp_path):
    prefix = make_null_corpus(str(tmp_path), "docs", [31] * 64)
    save = str(tmp_path / "ckpt")
    counts = run_distributed(_saves_checked, 2, prefix, save, str(tmp_path / "a.jsonl"))
    assert counts == [1, 1]
    straight = str(tmp_path / "straight.jsonl")
    run_pretrain(tiny_args(prefix, straight, 4, *FLAGS), nproc=2)
    resumed = str(tmp_path / "resumed.jsonl")
    run_pretrain(tiny_args(prefix, resumed, 4, *FLAGS, "--load", save), nproc=2)
    expected = read_steps(straight)[3:]
    records = read_steps(resumed)
    assert [r["iteration"] for r in records] == [4]
    for a, b in zip(expected, records, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
