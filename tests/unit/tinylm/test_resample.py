"""Batch resampling (tools/resample_batches.py): the draw against torch.multinomial itself, its
inclusion frequencies against the exact inclusion probabilities of successive sampling, and the
batch-losses / batch-list files."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

from megatron_slm.data.sample_list import (
    RECORD,
    BatchLossesWriter,
    SampleListDataset,
    SampleListError,
    read_batch_list,
    read_batch_losses,
)
from megatron_slm.tinylm.resample import draw_batches, kept_count

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "n,keep,temperature,seed", [(50, 0.5, 1.0, 0), (37, 0.3, 0.25, 7), (8, 1.0, 2.0, 3)]
)
def test_draw_is_torch_multinomial(n, keep, temperature, seed):
    losses = np.random.default_rng(seed).uniform(1.0, 6.0, n)
    got = draw_batches(losses, keep, temperature, seed)
    p = torch.softmax(torch.tensor(losses, dtype=torch.float64) / temperature, dim=0)
    g = torch.Generator().manual_seed(seed)
    n0 = max(1, round(keep * n))
    assert got == torch.multinomial(p, n0, replacement=False, generator=g).tolist()
    assert len(set(got)) == n0 == kept_count(n, keep)


def exact_inclusion(p: np.ndarray, k: int) -> np.ndarray:
    """Inclusion probabilities of successive sampling (each pick proportional to p among the
    items left), by enumerating every ordered draw of k items."""
    pi = np.zeros(len(p))
    for order in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        pi[list(order)] += prob
    return pi


def test_inclusion_frequencies_match_successive_sampling():
    """Over M seeds, each batch's inclusion frequency is within eps of its exact probability.

    False-failure rate: Hoeffding gives P(|freq_i - pi_i| >= eps) <= 2 exp(-2 M eps^2) per batch;
    eps is chosen so the union over the N batches is <= ALPHA = 1e-6 (for seeds drawn at random;
    the seeds here are fixed, so the test is deterministic)."""
    losses = np.array([1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
    temperature, keep, m, alpha = 1.0, 0.5, 6000, 1e-6
    n, k = len(losses), kept_count(len(losses), keep)
    p = torch.softmax(torch.tensor(losses) / temperature, 0).numpy()
    pi = exact_inclusion(p, k)
    assert math.isclose(pi.sum(), k, rel_tol=1e-12)
    eps = math.sqrt(math.log(2 * n / alpha) / (2 * m))
    counts = np.zeros(n)
    for seed in range(m):
        counts[draw_batches(losses, keep, temperature, seed)] += 1
    freq = counts / m
    assert np.abs(freq - pi).max() < eps, (freq, pi, eps)
    # The test has the power to tell successive sampling from the naive k * p_i.
    assert np.abs(np.minimum(k * p, 1) - pi).max() > 2 * eps


def _source(g=4, batches=10):
    fp = {"name": "corpus", "fingerprint": "abc"}
    return {"datasets": [fp], "weights": None, "split": "100,0,0", "seq_length": 16, "seed": 5,
            "num_samples": None, "global_batch_size": g, "batches": batches}  # fmt: skip


def _write_losses(prefix, source, loss, tokens):
    records = np.zeros(len(loss), dtype=RECORD)
    records["loss"], records["tokens"] = loss, tokens
    w = BatchLossesWriter(prefix, {"source": source}, len(loss))
    w.write_range(8, records[8:])  # out of order, as data-parallel ranks finish
    w.write_range(0, records[:8])
    w.finalize()
    return records


def test_losses_file_batch_losses_and_resume(tmp_path):
    source = _source(g=4, batches=4)
    rng = np.random.default_rng(0)
    loss, tokens = rng.uniform(1, 5, 16).astype(np.float32), rng.integers(1, 16, 16)
    records = _write_losses(str(tmp_path / "l"), source, loss, tokens)
    got = read_batch_losses(str(tmp_path / "l.json"))
    assert got.records.tobytes() == records.tobytes()
    want = [
        np.average(loss[i : i + 4].astype(np.float64), weights=tokens[i : i + 4])
        for i in (0, 4, 8, 12)
    ]
    np.testing.assert_allclose(got.batch_losses(), want, rtol=1e-12)
    with pytest.raises(SampleListError, match="already exists"):
        BatchLossesWriter(str(tmp_path / "l"), {"source": source}, 16)
    # A partial run with other settings is refused; the same settings resume its ranges.
    w = BatchLossesWriter(str(tmp_path / "p"), {"source": source}, 16)
    w.write_range(4, records[4:8])
    with pytest.raises(SampleListError, match="other settings"):
        BatchLossesWriter(str(tmp_path / "p"), {"source": dict(source, seed=6)}, 16)
    again = BatchLossesWriter(str(tmp_path / "p"), {"source": source}, 16)
    assert again.completed_ranges() == [(4, 8)]
    with pytest.raises(SampleListError, match="never written"):
        again.finalize()


def test_resample_tool_writes_the_draw_and_reports(tmp_path, capsys):
    source = _source(g=4, batches=10)
    loss = np.repeat(np.linspace(1, 5, 10), 4).astype(np.float32)
    _write_losses(str(tmp_path / "l"), source, loss, np.full(40, 16))
    out = str(tmp_path / "round2.idx")
    tool = _tool("resample_batches")
    argv = ["--losses", str(tmp_path / "l"), "--keep", "0.5", "--temperature", "0.5"]
    assert tool.main([*argv, "--seed", "3", "--output", out]) == 0
    text = capsys.readouterr().out
    assert "kept 5 of 10 batches (50.0%)" in text and "kept" in text.splitlines()[-1]
    blist = read_batch_list(out)
    assert blist.batches == draw_batches(np.linspace(1, 5, 10), 0.5, 0.5, 3)
    assert blist.source == source and blist.meta["draw"]["seed"] == 3
    kept = np.linspace(1, 5, 10)[blist.batches]
    assert math.isclose(blist.meta["report"]["kept"]["mean"], kept.mean(), rel_tol=1e-6)
    # bad input: one line naming the flag, exit status 2
    assert tool.main([*argv, "--seed", "3", "--output", out, "--losses", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resample_batches: error: --losses") and "\n" not in err
    assert tool.main(["--losses", str(tmp_path / "l"), "--keep", "1.5", "--output", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resample_batches: error: --keep") and "\n" not in err


def test_sample_list_dataset_maps_whole_batches(tmp_path):
    ds = SampleListDataset(list(range(100, 140)), [7, 2, 9], 4)
    assert len(ds) == 12
    assert [ds[i] for i in range(12)] == [
        128,
        129,
        130,
        131,
        108,
        109,
        110,
        111,
        136,
        137,
        138,
        139,
    ]
    bad = tmp_path / "bad.idx"
    bad.write_text(json.dumps({"format": "something"}))
    with pytest.raises(SampleListError, match="--train-samples-from .*bad.idx: not a"):
        read_batch_list(str(bad))


@pytest.mark.parametrize(
    "ids,message",
    [
        ([0, 10], "batch id 10 (entry 1) is outside the source order, whose 10 batches have ids "
                  "0..9"),
        ([-1], "batch id -1 (entry 0) is outside"),
        ([3, 10**7], "batch id 10000000 (entry 1) is outside"),
        ([1.5], "batch id 1.5 (entry 0) is not an integer"),
        ([True], "batch id True (entry 0) is not an integer"),
        (["3"], "batch id '3' (entry 0) is not an integer"),
        ({"0": 1}, "'batches' is not a list"),
    ],
)  # fmt: skip
def test_batch_ids_outside_the_source_are_refused(tmp_path, ids, message):
    """Every id is checked against the source's batch count when a list is read, and when one
    is written; ids 0 and N-1 are the valid ends."""
    from megatron_slm.data.sample_list import LIST_FORMAT, write_batch_list

    source = _source(g=4, batches=10)
    path = tmp_path / "r.idx"
    meta = {"format": LIST_FORMAT, "version": 1, "source": source, "batches": ids}
    path.write_text(json.dumps(meta))
    with pytest.raises(SampleListError) as e:
        read_batch_list(str(path))
    assert str(e.value).startswith(f"--train-samples-from {path}: {message}")
    if isinstance(ids, list) and not any(isinstance(b, str | bool) for b in ids):
        with pytest.raises(SampleListError, match="--output .*: " + message.split(" (")[0]):
            write_batch_list(str(tmp_path / "w.idx"), source, ids)
        assert not os.path.exists(tmp_path / "w.idx")
    write_batch_list(str(path), source, [9, 0])
    assert read_batch_list(str(path)).batches == [9, 0]
    no_count = {k: v for k, v in source.items() if k != "batches"}
    path.write_text(json.dumps(dict(meta, source=no_count, batches=[0])))
    with pytest.raises(SampleListError, match="r.idx: the source record has no batch count"):
        read_batch_list(str(path))
    path.write_text(json.dumps({k: v for k, v in meta.items() if k != "batches"}))
    with pytest.raises(SampleListError, match="r.idx: no 'batches' list"):
        read_batch_list(str(path))


def test_list_of_another_order_length_is_refused_before_step_1(tmp_path):
    """The ids were checked against the source record's count; the trainer then checks that
    count against the order it builds (megatron-core: min(num_samples, len) // G batches)."""
    from megatron_slm.data.sample_list import write_batch_list
    from megatron_slm.training.rounds import wrap_train_dataset

    path = str(tmp_path / "r.idx")
    write_batch_list(path, dict(_source(g=4, batches=10), num_samples=40), [9, 0])
    blist = read_batch_list(path)
    ds = wrap_train_dataset(blist, list(range(100, 140)))
    assert [ds[i] for i in range(8)] == [136, 137, 138, 139, 100, 101, 102, 103]
    with pytest.raises(SampleListError, match="the source order has 9 batches here, 10 when"):
        wrap_train_dataset(blist, list(range(36)))


def test_multi_round_script_parses_and_uses_real_flags():
    """examples/multi_round.sh: bash syntax, and every --flag it passes exists in the CLIs it
    calls (the job runs end to end in tests/functional/test_slurm.py)."""
    import re
    import subprocess

    from megatron_slm.training.config import build_parser

    script = os.path.join(REPO, "examples", "multi_round.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    known = set()
    for parser in (
        build_parser(),
        _tool("score_batches").main.command_line.parser(),
        _tool("resample_batches").main.command_line.parser(),
    ):
        known |= {s for a in parser._actions for s in a.option_strings}
    with open(script) as f:
        body = "\n".join(line for line in f if not line.lstrip().startswith("#"))
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", body)) - {"--nproc-per-node"}
    used -= {"--kill-on-bad-exit"}  # srun's
    assert used and used <= known, sorted(used - known)


def test_score_batches_flag_errors_exit_2(capsys):
    """Checked before any process group or model: one line naming the flag, exit status 2."""
    tool = _tool("score_batches")
    base = ["--load", "ckpt", "--data-path", "corpus", "--seq-length", "32", "--output", "o"]
    for extra, needle in (
        (["--global-batch-size", "6", "--micro-batch-size", "4"], "--micro-batch-size 4 must"),
        (["--global-batch-size", "0"], "--global-batch-size must be >= 1"),
        (
            ["--global-batch-size", "4", "--reset-attention-mask", "--transformer-impl", "local"],
            "--reset-attention-mask separates packed documents",
        ),
    ):
        assert tool.main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("score_batches: error: ") and needle in err and "\n" not in err
