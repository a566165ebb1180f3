"""The training step between log steps on a GPU under ``torch.cuda.set_sync_debug_mode("error")``
(bf16, the default layer spec, DataLoader workers with pinned memory, NCCL): any host wait raises.
The CPU twin (``tests/unit/training/test_train_step_syncs.py``) counts them with ``SyncCounter``;
this one also catches waits that only CUDA has (blocking copies, stream synchronisation)."""

from __future__ import annotations

import math
import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from megatron_slm import _extension
from tests.dist_helpers import free_port
from tests.functional.pretrain_helpers import OVERLAP_ARGS, tiny_args
from tests.unit.training.test_train_step_syncs import (
    LOG_EVERY,
    blend_of_two,
    check_source_shares,
    records_of,
    reference_losses,
)

pytestmark = pytest.mark.gpu


def _trainer_at_first_log_step(data_path, log_file, *extra):
    """A bf16 trainer on CUDA over a blend, after its first LOG_EVERY steps."""
    from megatron_slm import launch
    from megatron_slm.training.config import parse_config
    from megatron_slm.training.loop import Trainer, plan_training

    argv = tiny_args(data_path[1], log_file, 2 * LOG_EVERY, *data_path, *extra)  # a blend
    argv = [str(a) for a in argv]
    cfg = parse_config(argv + ["--device", "cuda", "--bf16", "--log-interval", str(LOG_EVERY)])
    plan = plan_training(cfg, 1)
    trainer = Trainer(cfg, plan, launch.initialize(device="cuda", seed=cfg.training.seed))
    for chunk in trainer.chunks:
        chunk.train()
    for _ in range(LOG_EVERY):
        assert trainer.advance() is None
    return trainer


def _steps_before_the_next_log_step(trainer) -> None:
    """The steps between two log steps, where any host wait raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(LOG_EVERY - 1):
            assert trainer.advance() is None
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _close(trainer) -> None:
    from megatron_slm import launch

    trainer.batches.close()
    trainer.log.close(trainer.iteration)
    launch.shutdown()


def _train(data_path, log_file, extra, ratio):
    trainer = _trainer_at_first_log_step(data_path, log_file, *extra)
    _steps_before_the_next_log_step(trainer)
    expected = reference_losses(trainer, ratio)
    assert trainer.advance() is None
    _close(trainer)
    return expected, records_of(log_file)


def _diverge(data_path, log_file, *extra):
    """--lr 1e30: step 2 sends the weights to about 1e29 (tiny_args warms up over 2 steps, the
    first at lr 0), every later step's gradient is NaN. Those steps must leave the bf16 weights
    and the fp32 main weights untouched, with no host wait (fused Adam's found_inf on CUDA); the
    log step then reads them back and goes on (--no-check-for-nan-in-loss-and-grad)."""
    trainer = _trainer_at_first_log_step(
        data_path, log_file, "--lr", "1e30", "--no-check-for-nan-in-loss-and-grad", *extra
    )
    main = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    before = [t.detach().clone() for t in [*trainer.chunks[0].parameters(), *main]]
    _steps_before_the_next_log_step(trainer)
    after = [*trainer.chunks[0].parameters(), *main]
    unchanged = len(before) == len(after) and all(map(torch.equal, before, after))
    assert trainer.advance() is None  # the log step: reads the norms, warns, goes on
    skipped = trainer.nonfinite.total
    _close(trainer)
    return unchanged, skipped, [r["grad_norm"] for r in records_of(log_file)]


def _worker(queue, port, *args, run=_train):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    try:
        queue.put(("ok", run(*args)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put(("error", traceback.format_exc()))


def _run_worker(*args, run=_train):
    """``run(*args)`` in a spawned child (a fresh CUDA context and an NCCL process group)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(queue, free_port(), *args), kwargs={"run": run})
    proc.start()
    # A child that dies without a word (a CUDA or NCCL abort) fails the test within two minutes,
    # before the GPU script's tests step (200 s) ends, and does not keep the GPU.
    try:
        status, payload = queue.get(timeout=120)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert status == "ok", payload
    return payload


# The selective op is held to zero syncs with its CUDA kernels; its pure-PyTorch fallback (no
# CUDA build of _C) selects with nonzero() and is not a GPU hot path.
SLM = pytest.param(
    ("--slm-ratio", "0.5", "--slm-select-mode", "loss"),
    0.5,
    id="slm",
    marks=pytest.mark.skipif(
        not _extension.HAS_CUDA_KERNELS, reason="megatron_slm._C built without CUDA kernels"
    ),
)


# The launch scripts' data parallelism (one rank here: the collectives run on a group of one, but
# the hooks, the asynchronous handles and the bf16 distributed optimizer's copies do run).
OVERLAP_CASE = pytest.param(OVERLAP_ARGS, None, id="overlap")
# Muon beside AdamW, in megatron-core's bf16 wrapper (fp32 main weights)
MUON = ("--optimizer", "muon")


@pytest.mark.parametrize(
    "extra, ratio",
    [pytest.param((), None, id="plain"), SLM, OVERLAP_CASE, pytest.param(MUON, None, id="muon")],
)
def test_no_host_sync_between_log_steps_on_gpu(tmp_path, extra, ratio):
    data_path = blend_of_two(str(tmp_path))
    payload = _run_worker(data_path, str(tmp_path / "log.jsonl"), extra, ratio)
    (loss_sum, n_valid, selected_sum, n_selected), records = payload
    assert [r["iteration"] for r in records] == list(range(1, 2 * LOG_EVERY + 1))
    # bf16 logits, fp32 losses: the step's forward and the reference see the same logits.
    assert records[-1]["loss"] == pytest.approx(loss_sum / n_valid, rel=1e-3)
    assert records[-1]["selected_loss"] == pytest.approx(selected_sum / n_selected, rel=1e-3)
    check_source_shares(records[-1], ratio)


@pytest.mark.parametrize("extra", [(), MUON], ids=["adam", "muon"])
def test_non_finite_steps_are_skipped_on_the_gpu_without_a_host_wait(tmp_path, extra):
    data_path = blend_of_two(str(tmp_path))
    log = str(tmp_path / "log.jsonl")
    unchanged, skipped, norms = _run_worker(data_path, log, *extra, run=_diverge)
    assert all(map(math.isfinite, norms[:2])) and not any(map(math.isfinite, norms[2:])), norms
    assert skipped == len(norms) - 2
    assert unchanged


def _muon_marks(data_path, log_file):
    """Which bf16 weights' fp32 main copies Muon holds, and the QKV split each carries."""
    from megatron_slm.optimizer_state import optimizer_parts
    from megatron_slm.training.muon import _QKV_SPLIT, Muon

    trainer = _trainer_at_first_log_step(data_path, log_file, *MUON)
    names = {id(p): n for n, p in trainer.chunks[0].named_parameters()}
    marks = {}
    for part in optimizer_parts(trainer.optimizer):
        if isinstance(part.optimizer, Muon):
            for model, main in zip(part.float16_groups, part.fp32_from_float16_groups):
                for model_param, main_param in zip(model, main):
                    assert main_param.dtype == torch.float32
                    marks[names[id(model_param)]] = getattr(main_param, _QKV_SPLIT, None)
    _close(trainer)
    return marks


def test_muon_reads_the_qkv_split_on_the_fp32_main_weights(tmp_path):
    """megatron-core's bf16 wrapper makes fp32 copies of the weights, which Muon steps: the
    fused QKV weights' split (query, key and value rows per group) must be on them."""
    marks = _run_worker(blend_of_two(str(tmp_path)), str(tmp_path / "log.jsonl"), run=_muon_marks)
    qkv = {n: m for n, m in marks.items() if n.endswith("linear_qkv.weight")}
    assert qkv and all(m == (32, 16, 16) for m in qkv.values()), marks  # tiny: 4 heads, 2 groups
    assert all(m is None for n, m in marks.items() if n not in qkv)
