"""Megatron-LM's logging flags in the real ``Trainer``, each value against an independent count.

``--log-params-norm``: the L2 norm of the weights, recomputed in float64 from the model.
``--log-num-zeros-in-grad``: the zero entries of the step's gradients, counted in the gradient
buffers the step reduced into. Both only at log steps, in the record, on the console and in
TensorBoard; the TensorBoard flags (``--tensorboard-log-interval``, ``--log-timers-to-tensorboard``,
``--log-batch-size-to-tensorboard``, ``--log-world-size-to-tensorboard``,
``--log-memory-to-tensorboard``) read back from the event files. (Across tensor parallelism:
``tests/functional/test_pretrain.py::test_resume_tp1_checkpoint_at_tp2``.)
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.functional.pretrain_helpers import (
    close_trainer,
    cpu_trainer,
    make_null_corpus,
    read_steps,
    refusal,
    tiny_args,
)

FLAGS = ("--log-params-norm", "--log-num-zeros-in-grad", "--log-memory-to-tensorboard",
         "--log-timers-to-tensorboard", "--log-batch-size-to-tensorboard",
         "--log-world-size-to-tensorboard", "--log-validation-ppl-to-tensorboard",
         "--timing-log-level", 2, "--timing-log-option", "all", "--tensorboard-log-interval", 2,
         "--tensorboard-queue-size", 5, "--log-interval", 2)  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_null_corpus(str(tmp_path_factory.mktemp("logging")), "c", [30] * 80)


def _worker(rank, world, prefix, log, tb):
    import contextlib
    import io

    trainer = cpu_trainer(tiny_args(prefix, log, 4, "--num-workers", 0, "--tensorboard-dir", tb,
                                    *FLAGS))  # fmt: skip
    expected = []
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        for _ in range(4):
            trainer.advance()
            params = [p for p in trainer.chunks[0].parameters()]
            norm = torch.stack([p.detach().double().square().sum() for p in params]).sum().sqrt()
            zeros = sum(int((p.main_grad == 0).sum()) for p in params)  # (kept until next step)
            expected.append((norm.item(), zeros, sum(p.numel() for p in params)))
        close_trainer(trainer)
    return expected, console.getvalue()


def test_log_step_figures_and_tensorboard_flags(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log, tb = str(tmp_path / "log.jsonl"), str(tmp_path / "tb")
    expected, console = run_distributed(_worker, 1, corpus, log, tb)[0]
    records = read_steps(log)
    for record, (norm, zeros, numel) in zip(records, expected):
        if record["iteration"] % 2:  # not a log step: nothing computed
            assert "params_norm" not in record and "num_zeros_in_grad" not in record
            assert "mem_max_rss_bytes" not in record
            continue
        assert record["params_norm"] == pytest.approx(norm, rel=1e-6)
        # The embedding rows of the ids a step does not see have no gradient: many zeros.
        assert record["num_zeros_in_grad"] == zeros and 0 < zeros < numel
        assert record["mem_max_rss_bytes"] > 1 << 20
    shown = [line for line in console.splitlines() if line.startswith("iter")]
    assert len(shown) == 2 and f"zeros in grad {records[-1]['num_zeros_in_grad']:,}" in shown[-1]
    assert f"params norm {records[-1]['params_norm']:.3f}" in shown[-1]
    acc = EventAccumulator(tb, size_guidance={"scalars": 0}).Reload()
    steps = {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    for tag in ("loss", "params_norm", "num_zeros_in_grad", "step_seconds", "global_batch_size",
                "world_size", "memory/max_rss_bytes"):  # fmt: skip
        assert steps[f"slm/{tag}"] == [2, 4], tag  # --tensorboard-log-interval 2
    by_step = {r["iteration"]: r for r in records}
    for tag, key in (("params_norm", "params_norm"), ("step_seconds", "step_seconds"),
                     ("global_batch_size", "global_batch_size")):  # fmt: skip
        for event in acc.Scalars(f"slm/{tag}"):
            assert event.value == pytest.approx(by_step[event.step][key], rel=1e-6)
    assert [e.value for e in acc.Scalars("slm/world_size")] == [1, 1]


def test_logging_flags_that_do_not_fit_are_one_line(capsys):
    from megatron_slm.training.config import parse_config

    for argv, message in (
        (("--tensorboard-log-interval", 0), "--tensorboard-log-interval must be >= 1"),
        (("--timing-log-level", 3), "invalid choice"),
    ):
        argv = ["--data-path", "A", "--train-iters", "4", *map(str, argv)]
        assert message in refusal(lambda: parse_config(argv), capsys)  # noqa: B023


def _wandb_rows(run_file: str) -> tuple[object, dict[int, dict]]:
    """W&B's offline run file read back: its run record and ``{step: {tag: value}}``. The file
    is a LevelDB-style log (32 KiB blocks of records with a 7-byte header: crc, length, type
    full/first/middle/last) of ``wandb_internal_pb2.Record`` messages after a 7-byte file header."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    with open(run_file, "rb") as f:
        raw = f.read()
    assert raw[:4] == b":W&B"
    records, part, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            part = data
        elif kind in (3, 4):  # middle, last
            part += data
        if kind in (1, 4):
            records.append(pb.Record.FromString(part))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = r.history.item  # a tag with "/" is stored as its parts
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            rows[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run, rows


def test_wandb_run_holds_the_tensorboard_scalars(corpus, tmp_path):
    """--wandb-project (W&B offline, as on a machine without network): the run has the name and
    the flags it was given, and at every step exactly the scalars TensorBoard has, same values
    (training and validation scalars of one step in one row)."""
    import glob
    import json

    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.functional.pretrain_helpers import run_pretrain

    tb, wdir = str(tmp_path / "tb"), str(tmp_path / "wandb_files")
    run_pretrain(
        tiny_args(corpus, str(tmp_path / "log.jsonl"), 4, "--tensorboard-dir", tb,
                  "--split", "80,20,0", "--eval-interval", 2, "--eval-iters", 1,
                  "--wandb-project", "slm-test", "--wandb-exp-name", "tiny-run",
                  "--wandb-save-dir", wdir),
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )  # fmt: skip
    (run_file,) = glob.glob(f"{wdir}/wandb/offline-run-*/run-*.wandb")
    run, rows = _wandb_rows(run_file)
    assert (run.project, run.display_name) == ("slm-test", "tiny-run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["lr"] == 3e-3 and config["wandb_project"] == "slm-test"
    acc = EventAccumulator(tb, size_guidance={"scalars": 0}).Reload()
    board: dict[int, dict] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            board.setdefault(event.step, {})[tag] = event.value
    assert sorted(rows) == sorted(board) == [1, 2, 3, 4]
    assert "slm/validation_loss" in rows[2] and "slm/loss" in rows[2]
    for step, scalars in board.items():
        assert rows[step].keys() == scalars.keys(), step
        for tag, value in scalars.items():  # TensorBoard keeps float32
            assert rows[step][tag] == pytest.approx(value, rel=1e-6), (step, tag)


def test_wandb_flags_refused_alone(corpus, tmp_path, capsys):
    from megatron_slm.training.config import parse_config

    argv = [str(a) for a in tiny_args(corpus, str(tmp_path / "l"), 2, "--wandb-exp-name", "x")]
    line = refusal(lambda: parse_config(argv), capsys)
    assert line.endswith("--wandb-exp-name needs --wandb-project")
