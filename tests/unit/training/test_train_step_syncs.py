"""The training step between log steps never waits for the device (issue 26, item 2).

A tiny model trains in-process (the real ``Trainer`` of ``python -m megatron_slm.pretrain``); the
steps strictly between two log steps run inside ``SyncCounter`` and must read nothing back. The
log step afterwards must still log the right values: its loss (and, with selection, its selected
loss) is recomputed independently, in float64 with ``torch.nn.functional.cross_entropy`` on the
logits of the same batch and the same weights, and the records of the silent steps appear only
once the log step has read them.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.functional.pretrain_helpers import OVERLAP_ARGS, make_null_corpus, tiny_args

LOG_EVERY = 4
ITERS = 2 * LOG_EVERY


def blend_of_two(directory: str) -> list[str]:
    """``--data-path`` of a two-source blend: the step also counts tokens per source."""
    a = make_null_corpus(directory, "docs", [31] * 96)
    b = make_null_corpus(directory, "more", [23] * 96, seed=1)
    return ["--data-path", "0.5", a, "0.5", b]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return blend_of_two(str(tmp_path_factory.mktemp("syncs")))


def reference_losses(trainer, ratio):
    """Sum of the per-token losses, valid-token count, sum over the tokens the step selects
    (top ``ratio`` of each micro-batch by loss, ``--slm-select-mode loss``), selected count:
    for the global batch the next step will read, with the current weights, all DP ranks."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state

    from megatron_slm.training.data import MicroBatches

    peek = MicroBatches(
        trainer.train_ds, trainer.cfg.training.micro_batch_size, trainer.batches.consumed_samples
    )
    totals = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(trainer.sizes.num_microbatches):
            batch = {k: v.to(trainer.device) for k, v in next(peek).items()}
            logits = trainer.chunks[0](batch["tokens"], batch["position_ids"], None)  # [b, s, v]
            loss = F.cross_entropy(
                logits.double().flatten(0, 1), batch["labels"].flatten(), reduction="none"
            )
            valid = batch["loss_mask"].flatten().bool()
            kept = loss[valid].sort(descending=True).values
            k = round(ratio * kept.numel()) if ratio is not None else kept.numel()
            totals += torch.tensor([kept.sum().item(), kept.numel(), kept[:k].sum().item(), k])
    totals = totals.to(trainer.device)
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return totals.tolist()


def records_of(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def _worker(rank, world, data_path, log_file, extra, ratio):
    from megatron_slm import launch
    from megatron_slm.training.config import parse_config
    from megatron_slm.training.loop import Trainer, plan_training
    from tests.sync_counter import SyncCounter

    argv = tiny_args(data_path[1], log_file, ITERS, *data_path, *extra)  # the blend overrides
    cfg = parse_config([str(a) for a in argv] + ["--log-interval", str(LOG_EVERY)])
    plan = plan_training(cfg, world)
    device = launch.initialize(device="cpu", seed=cfg.training.seed)
    trainer = Trainer(cfg, plan, device)
    for chunk in trainer.chunks:
        chunk.train()
    for _ in range(LOG_EVERY):  # up to and including the first log step
        assert trainer.advance() is None
    with SyncCounter() as counter:
        for _ in range(LOG_EVERY - 1):
            assert trainer.advance() is None
    before_log_step = [r["iteration"] for r in records_of(log_file)]
    # (the MTP heads' values have their own independent check: tests/functional/test_mtp.py)
    expected = None if trainer.mtp is not None else reference_losses(trainer, ratio)
    assert trainer.advance() is None  # the second log step reads steps LOG_EVERY+1 .. 2*LOG_EVERY
    trainer.batches.close()
    trainer.log.close(trainer.iteration)
    return counter.count, counter.report(), before_log_step, expected, records_of(log_file)


@pytest.mark.parametrize(
    "world, extra, ratio",
    [
        (2, (), None),  # plain causal LM, two data-parallel ranks
        (1, ("--slm-ratio", "0.5", "--slm-select-mode", "loss"), 0.5),  # the selective op
        (2, OVERLAP_ARGS, None),  # the launch scripts' data parallelism
    ],
    ids=["plain-dp2", "slm", "overlap-dp2"],
)
def test_no_host_sync_between_log_steps(corpus, tmp_path, world, extra, ratio):
    log_file = str(tmp_path / "steps.jsonl")
    results = run_distributed(_worker, world, corpus, log_file, extra, ratio)
    for count, report, *_ in results:
        assert count == 0, report
    *_, before_log_step, expected, records = results[-1]  # the last rank writes the log
    # The silent steps were not read (nor written) until the log step.
    assert before_log_step == list(range(1, LOG_EVERY + 1))
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    window = records[LOG_EVERY:]
    assert len({r["step_seconds"] for r in window}) == 1  # timed together, from one read
    last = records[-1]
    loss_sum, n_valid, selected_sum, n_selected = expected
    assert last["loss"] == pytest.approx(loss_sum / n_valid, rel=1e-5)
    assert last["n_selected"] == n_selected
    assert last["selected_loss"] == pytest.approx(selected_sum / n_selected, rel=1e-5)
    assert all(r["grad_norm"] > 0 for r in records)
    check_source_shares(last, ratio)


def test_no_host_sync_while_distilling(corpus, tmp_path):
    """A teacher beside the student (--export-kd-teacher-load, the KD loss beside the LM loss):
    its forward, the KL divergence and the loss balance stay on the device too."""
    from tests.functional.pretrain_helpers import run_pretrain

    teacher = str(tmp_path / "teacher")
    run_pretrain(tiny_args(corpus[2], str(tmp_path / "t.jsonl"), 3, *corpus, "--save", teacher))
    settings = tmp_path / "kd.yaml"
    settings.write_text("skip_lm_loss: false\n")
    extra = ("--export-kd-teacher-load", teacher, "--export-kd-cfg", str(settings))
    log_file = str(tmp_path / "steps.jsonl")
    ((count, report, _, expected, records),) = run_distributed(
        _worker, 1, corpus, log_file, extra, None
    )
    assert count == 0, report
    assert records[-1]["loss"] == pytest.approx(expected[0] / expected[1], rel=1e-5)
    assert all(r["kd_loss"] > 0 for r in records)


def test_no_host_sync_with_multi_token_prediction(corpus, tmp_path):
    """Two MTP heads beside Rho-1's selection (--mtp-num-layers): their losses, the shifted
    masks' statistics and the per-step weight of the heads stay on the device too."""
    extra = ("--mtp-num-layers", "2", "--slm-ratio", "0.5", "--slm-select-mode", "loss")
    log_file = str(tmp_path / "steps.jsonl")
    ((count, report, *_, records),) = run_distributed(_worker, 1, corpus, log_file, extra, 0.5)
    assert count == 0, report
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    assert all(r["mtp_1_loss"] > 0 and r["mtp_2_loss"] > 0 for r in records)


def check_source_shares(record, ratio) -> None:
    """The blend's two sources are counted apart: all of each is trained without selection,
    about ``ratio`` of each with it (the kept tokens of a micro-batch come from both)."""
    shares = record["selected_fraction_by_source"]
    assert len(shares) == 2, shares
    for share in shares.values():
        assert share == 1.0 if ratio is None else 0 < share < 1, shares
