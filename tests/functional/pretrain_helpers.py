"""Run ``megatron_slm.pretrain`` as users do (a process of its own, torchrun for several ranks)
on small synthetic corpora, and read back its per-step JSON log. The processes are forked from a
preloaded interpreter (tests/zygote.py)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from megatron_slm.data import preprocess_corpus
from tests import zygote

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 512  # the NullTokenizer's ids in all, EOD (= VOCAB - 1) the last
VOCAB_FLAG = VOCAB - 1  # its --vocab-size (Megatron-LM's: the ids before the EOD)
# The launch scripts' data parallelism at scale (sharded optimizer, overlapped collectives), with
# buckets small enough that the tiny model has several.
OVERLAP_ARGS = (
    "--use-distributed-optimizer",
    "--overlap-grad-reduce",
    "--overlap-param-gather",
    "--ddp-bucket-size",
    "30000",
)


def make_null_corpus(directory: str, name: str, doc_lengths, seed: int = 0) -> str:
    """NullTokenizer corpus: documents of random ids (< VOCAB - 1) of the given token lengths
    (EOD appended, so a document occupies length + 1 tokens). Returns the data prefix."""
    rng = np.random.default_rng(seed)
    # A learnable pattern: each document counts upward from a random start.
    lines = []
    for n in doc_lengths:
        start = int(rng.integers(0, VOCAB - 1))
        ids = [(start + 3 * i) % (VOCAB - 1) for i in range(n)]
        lines.append(json.dumps({"text": " ".join(map(str, ids))}))
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    out = preprocess_corpus(
        [path],
        os.path.join(directory, name),
        "NullTokenizer",
        vocab_size=VOCAB_FLAG,
        append_eod=True,
    )
    return out["text"]


def documents_and_checkpoint(root, iters: int, *extra) -> tuple[str, str]:
    """A corpus of documents shorter than a row (32 tokens: rows hold several, so attention
    masks and loss-mask holes at each EOD matter) and a tiny model trained ``iters`` steps on it
    (``extra``: more flags): (data prefix, checkpoint)."""
    prefix = make_null_corpus(str(root), "docs", [13, 7, 21, 9] * 24)
    ckpt = os.path.join(str(root), "ckpt")
    run_pretrain(
        tiny_args(prefix, os.path.join(str(root), "c.jsonl"), iters, "--save", ckpt, *extra)
    )
    return prefix, ckpt


def run_pretrain(
    args,
    nproc: int = 1,
    env: dict | None = None,
    check: bool = True,
    timeout=600,
    entry: tuple[str, ...] = ("-m", "megatron_slm.pretrain"),
):
    """``entry``: what runs the trainer (a module, or a script that wraps its ``main``)."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port"]
        cmd += [str(_free_port())]
    cmd += [*entry, "--device", "cpu", *map(str, args)]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **(env or {}))
    proc = zygote.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_tool(name: str, *args, status: int = 0):
    """``tools/<name>.py args`` as a real command (through the zygote), asserting its exit
    ``status``; the completed process (text stdout and stderr)."""
    cmd = [sys.executable, os.path.join(REPO, "tools", f"{name}.py"), *map(str, args)]
    proc = zygote.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == status, proc.stderr[-3000:]
    return proc


def _free_port() -> int:
    from tests.dist_helpers import free_port

    return free_port()


def read_steps(path: str) -> list[dict]:
    with open(path) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def tiny_args(data_prefix, log_file: str, iters: int, *extra, preset="tiny") -> list[str]:
    """A short run's flags; ``preset=None``: no --model-preset (``extra`` defines the model).
    ``data_prefix``: a NullTokenizer corpus, or a list of data and tokenizer flags instead."""
    if isinstance(data_prefix, str):
        data_prefix = ["--data-path", data_prefix, "--tokenizer-type", "NullTokenizer",
                       "--vocab-size", VOCAB_FLAG]  # fmt: skip
    return [
        *data_prefix,
        *(("--model-preset", preset) if preset else ()),
        "--seq-length", 32,
        "--micro-batch-size", 2,
        "--global-batch-size", 8,
        "--train-iters", iters,
        "--lr", "3e-3",
        "--lr-warmup-iters", 2,
        "--eval-interval", 0,
        "--log-interval", 1,
        "--split", "100,0,0",
        "--log-loss-file", log_file,
        *extra,
    ]  # fmt: skip


def megatron_rates(steps: int, increment, **schedule) -> list[float]:
    """The learning rate of each of ``steps`` steps under megatron-core's own scheduler built
    on ``schedule`` (its keyword arguments, constant weight decay) and stepped by ``increment``
    (1: steps; the global batch size: Megatron-LM's sample counting; a list: each step's)."""
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = OptimizerParamScheduler(
        opt, init_lr=0.0, start_wd=0.1, end_wd=0.1, wd_incr_style="constant", **schedule
    )
    rates = []
    for step in range(steps):
        scheduler.step(increment=increment[step] if isinstance(increment, list) else increment)
        rates.append(opt.param_groups[0]["lr"])
    return rates


def whole_and_resumed_runs(argv, tmp: str, stop_after: int, other: tuple):
    """In a ``run_distributed`` worker: the records of the run ``argv(log, *extra)`` (its flags
    logging to ``log``) trained whole, and stopped after ``stop_after`` steps (saved) then
    resumed; the scheduler's position at the resume; the refusal (message) of a resume with the
    ``other`` flags added, or None."""
    from megatron_slm.errors import ConfigError

    runs = {}
    whole = cpu_trainer(argv(f"{tmp}/whole.jsonl"))
    whole.train()
    close_trainer(whole)
    runs["whole"] = read_steps(f"{tmp}/whole.jsonl")
    save = f"{tmp}/ckpt"
    first = cpu_trainer(argv(f"{tmp}/resumed.jsonl", "--save", save))
    for _ in range(stop_after):
        first.advance()
    first.save()
    close_trainer(first)
    resumed = cpu_trainer(argv(f"{tmp}/resumed.jsonl", "--load", save))
    position = resumed.scheduler.num_steps
    resumed.train()
    close_trainer(resumed)
    runs["resumed"] = read_steps(f"{tmp}/resumed.jsonl")
    try:
        cpu_trainer(argv(f"{tmp}/other.jsonl", *other, "--load", save))
        refused = None
    except ConfigError as e:
        refused = str(e)
    return runs, position, refused


def check_growing_batch(runs: dict, sizes: list[int], **schedule) -> None:
    """A run whose global batch grows (``runs["whole"]``, its records): each step's batch is
    ``sizes``' and consumes it, its learning rate is megatron-core's scheduler on ``schedule``
    counting samples (a step of b samples advances it by b), and the run stopped and resumed
    (``runs["resumed"]``) logs the same records."""
    import pytest

    whole = runs["whole"]
    assert [r["global_batch_size"] for r in whole] == sizes
    assert [r["consumed_samples"] for r in whole] == np.cumsum(sizes).tolist()
    rates = megatron_rates(len(sizes), sizes, **schedule)
    for step, (record, rate) in enumerate(zip(whole, rates, strict=True)):
        assert record["lr"] == pytest.approx(rate, rel=1e-12, abs=0), step
    keys = ("loss", "lr", "grad_norm", "consumed_samples", "global_batch_size")
    assert [[r[k] for k in keys] for r in runs["resumed"]] == [[r[k] for k in keys] for r in whole]


def cpu_trainer(argv, world: int = 1):
    """The real ``Trainer`` in this process (inside a ``run_distributed`` worker of ``world``
    data-parallel ranks) on CPU, for ``argv`` (the trainer's flags), its chunks in train mode."""
    from megatron_slm import launch
    from megatron_slm.training.config import parse_config
    from megatron_slm.training.loop import Trainer, plan_training

    cfg = parse_config([str(a) for a in argv])
    plan = plan_training(cfg, world)
    device = launch.initialize(device="cpu", seed=cfg.training.seed)
    trainer = Trainer(cfg, plan, device)
    for chunk in trainer.chunks:
        chunk.train()
    return trainer


def close_trainer(trainer) -> None:
    """What ``Trainer.train`` closes at its end: the data workers, the log, --manual-gc."""
    trainer.batches.close()
    for batches in trainer.valid_batches.values():
        batches.close()
    trainer.log.close(trainer.iteration)
    trainer.manual_gc.close()


def refusal(call, capsys) -> str:
    """The one line a refused configuration gives: the error's message, or the parser's last
    line on stderr (exit status 2)."""
    import pytest

    from megatron_slm.errors import CheckpointError, ConfigError

    with pytest.raises((ConfigError, CheckpointError, SystemExit)) as err:
        call()
    if isinstance(err.value, SystemExit):
        assert err.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]
    return str(err.value)
