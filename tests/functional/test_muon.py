"""``--optimizer muon`` in the trainer, as users run it: the loss falls, a stopped run resumes
with the same steps (Muon's momentum in the checkpoint), the checkpoint resumes at TP 2 with
TP 1's steps (the default ``--muon-tp-mode duplicated`` orthogonalises whole weights) and at
PP 2 (each stage's weights in a Muon of its own), while
``blockwise`` (each shard on its own) takes other steps; an AdamW checkpoint is not resumed with
Muon's state. The optimizer's own values are checked in ``tests/unit/training/test_muon.py``."""

import pytest

from tests.functional.pretrain_helpers import (
    make_null_corpus,
    read_steps,
    run_pretrain,
    tiny_args,
)

pytestmark = pytest.mark.slow
# fp32 Newton-Schulz iterations: TP 2's reduction order then moves the steps by fp32 rounding
# only (bf16 iterations, the default, are checked in the unit tests)
MUON = ("--optimizer", "muon", "--muon-fp32-matmul-prec", "highest", "--muon-nesterov",
        "--muon-extra-scale-factor", 0.2)  # fmt: skip


def _steps(prefix, log, *extra, nproc=1, iters=6):
    run_pretrain(tiny_args(prefix, str(log), iters, *MUON, *extra), nproc=nproc)
    return read_steps(str(log))


def test_muon_trains_resumes_and_gives_tp1_steps_at_tp2_and_pp2(tmp_path):
    prefix = make_null_corpus(str(tmp_path), "docs", [31] * 96)
    straight = _steps(prefix, tmp_path / "straight.jsonl")
    assert straight[-1]["loss"] < straight[0]["loss"] - 0.3, [r["loss"] for r in straight]
    ckpt = str(tmp_path / "ckpt")
    _steps(prefix, tmp_path / "first.jsonl", "--save", ckpt, "--exit-interval", 3)
    resumed = _steps(prefix, tmp_path / "resumed.jsonl", "--load", ckpt)
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[3:]]
    tp2 = ("--load", ckpt, "--tensor-model-parallel-size", 2)
    duplicated = _steps(prefix, tmp_path / "tp2.jsonl", *tp2, nproc=2)
    blockwise = _steps(
        prefix, tmp_path / "blockwise.jsonl", *tp2, "--muon-tp-mode", "blockwise", nproc=2
    )
    pp2 = _steps(
        prefix, tmp_path / "pp2.jsonl", "--load", ckpt, "--pipeline-model-parallel-size", 2,
        nproc=2,
    )  # fmt: skip
    for a, b, c in zip(straight[3:], duplicated, pp2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert c["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # the first step at TP 2 is the saved weights' loss either way; after it, blockwise's
    # updates differ (each half of a split weight orthogonalised alone)
    assert blockwise[0]["loss"] == pytest.approx(straight[3]["loss"], rel=1e-5)
    for a, c in zip(straight[4:], blockwise[1:]):  # (TP 2 duplicated: 0.0 apart here)
        assert abs(c["loss"] - a["loss"]) > 1e-4
    # an AdamW run's checkpoint: its optimizer state is not Muon's
    proc = run_pretrain(
        tiny_args(prefix, str(tmp_path / "adam.jsonl"), 6, "--load", ckpt), check=False
    )
    assert proc.returncode == 2
    assert (
        f"--load {ckpt}/iter_0000003: its optimizer state is muon's; this run trains with "
        "--optimizer adam: resume with --optimizer muon, with --no-load-optim (a fresh "
        "optimizer), or pass --finetune to load its weights only"
    ) in proc.stderr


def test_muon_trains_a_mixture_alike_with_the_experts_over_two_ranks(tmp_path):
    """With expert parallelism the experts' weights take a Muon of their own (megatron-core
    keeps their optimizer apart: other gradient-statistics ranks); from the same weights and a
    fresh optimizer, 2 ranks of 2 experts each take EP 1's steps."""
    prefix = make_null_corpus(str(tmp_path), "docs", [31] * 64)
    moe = ("--num-experts", 4, "--moe-router-topk", 2, "--moe-aux-loss-coeff", "1e-2")
    ckpt = str(tmp_path / "ckpt")
    _steps(prefix, tmp_path / "first.jsonl", *moe, "--save", ckpt, "--exit-interval", 1, iters=4)
    fresh = (*moe, "--load", ckpt, "--no-load-optim")
    ep1 = _steps(prefix, tmp_path / "ep1.jsonl", *fresh, iters=4)
    ep2 = _steps(
        prefix, tmp_path / "ep2.jsonl", *fresh, "--expert-model-parallel-size", 2, nproc=2,
        iters=4,
    )  # fmt: skip
    assert [r["iteration"] for r in ep2] == [2, 3, 4]
    assert ep1[-1]["loss"] < ep1[0]["loss"]
    for a, b in zip(ep1, ep2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        # the global norm: the experts' gradients summed over both ranks
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
