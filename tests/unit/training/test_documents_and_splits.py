"""Megatron-LM's document and per-split data flags in the real ``Trainer``.

``--reset-attention-mask``: each document of a packed row attends only to itself, so a token's
loss is the one of its document forwarded alone (the reference here: each document cut out of the
row at its end-of-document token and forwarded by itself, no mask at all), and the step still reads
nothing back between log steps. ``--eod-mask-loss`` and ``--reset-position-ids``: the loss mask and
position ids of Megatron-LM, written out from the tokens.

``--train-data-path`` / ``--valid-data-path`` with ``--multiple-validation-sets``: the model trains
on one corpus (with its sidecar, under selection) and validates on two others that have none; each
set's loss is the mean loss of its own samples, recomputed in float64. ``--data-args-path`` /
``--per-split-data-args-path`` give the blends their flags give; conflicting data flags and blend
files that do not fit are one line each.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_slm.errors import ConfigError
from megatron_slm.training.config import parse_config, validate
from tests.dist_helpers import run_distributed
from tests.functional.pretrain_helpers import (
    VOCAB,
    VOCAB_FLAG,
    close_trainer,
    cpu_trainer,
    make_null_corpus,
    tiny_args,
)
from tests.sync_counter import SyncCounter
from tests.unit.data import write_sidecar

LOG_EVERY = 3
EOD = VOCAB - 1  # NullTokenizer's end-of-document id


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("documents"))
    rng = np.random.default_rng(0)
    short = make_null_corpus(root, "short", rng.integers(2, 10, 160).tolist())  # rows of ~5 docs
    train = make_null_corpus(root, "train", [15] * 100, seed=1)  # a document every 16 tokens
    valid = make_null_corpus(root, "valid", [7] * 60, seed=2)  # ... every 8 tokens
    other = make_null_corpus(root, "other", [4] * 80, seed=3)  # ... every 5 tokens
    write_sidecar(train, lambda doc, pos: 0.5 + 0.01 * ((doc + pos) % 7))
    return {"short": short, "train": train, "valid": valid, "other": other}


def _token_losses(chunk, tokens):
    """float64 per-token losses of ``tokens [n]`` forwarded alone (plain causal), ``[n - 1]``."""
    import torch.nn.functional as F

    positions = torch.arange(len(tokens))[None]
    logits = chunk(tokens[None], positions, None)[0]  # [n, v]
    return F.cross_entropy(logits[:-1].double(), tokens[1:], reduction="none")


def _documents_worker(rank, world, data_prefix, log_file):
    from megatron_slm.training.data import MicroBatches

    argv = tiny_args(data_prefix, log_file, 2 * LOG_EVERY, "--log-interval", LOG_EVERY)
    trainer = cpu_trainer(
        [*argv, "--reset-attention-mask", "--eod-mask-loss", "--reset-position-ids"]
    )
    chunk = trainer.chunks[0]
    batch = next(iter(MicroBatches(trainer.train_ds, trainer.cfg.training.micro_batch_size, 0)))
    with torch.no_grad():
        output, _ = trainer._forward_step(None, 0, iter([batch]), chunk)  # [b, s] per-token loss
        plain = chunk(batch["tokens"], batch["position_ids"], None)  # one causal row, for contrast
    rows = []
    for r in range(batch["tokens"].shape[0]):
        tokens, labels = batch["tokens"][r], batch["labels"][r]
        text = torch.cat([tokens, labels[-1:]])  # the row's s + 1 tokens
        ends = (tokens == EOD).nonzero().flatten().tolist()  # a document ends with its EOD
        expected = torch.empty(len(tokens), dtype=torch.float64)
        start = 0
        for end in [*ends, len(tokens) - 1]:  # the row's last document may be cut short
            if start <= end:
                # Positions start..end see only text[start..j] and predict text[j + 1]: the
                # document forwarded alone, with the token after its last position.
                expected[start : end + 1] = _token_losses(chunk, text[start : end + 2])
            start = end + 1
        rows.append(
            {
                "trainer": output[r].double(),
                "expected": expected,
                "plain": torch.nn.functional.cross_entropy(
                    plain[r].double(), labels, reduction="none"
                ),
                "tokens": tokens,
                "loss_mask": batch["loss_mask"][r],
                "position_ids": batch["position_ids"][r],
            }
        )
    for _ in range(LOG_EVERY):  # up to and including the first log step
        assert trainer.advance() is None
    with SyncCounter() as counter:
        for _ in range(LOG_EVERY - 1):
            assert trainer.advance() is None
    close_trainer(trainer)
    return rows, counter.count, counter.report()


def _positions_after_resets(tokens):
    """Megatron-LM's ``--reset-position-ids``: 0 again after every end-of-document token."""
    out, pos = [], 0
    for t in tokens.tolist():
        out.append(pos)
        pos = 0 if t == EOD else pos + 1
    return out


def test_each_document_attends_only_to_itself(corpora, tmp_path):
    rows, syncs, report = run_distributed(
        _documents_worker, 1, corpora["short"], str(tmp_path / "steps.jsonl")
    )[0]
    assert syncs == 0, report  # the mask is built from the tokens on the device
    after_first_end = []
    for row in rows:
        torch.testing.assert_close(row["trainer"], row["expected"], rtol=1e-4, atol=1e-5)
        ends = (row["tokens"] == EOD).nonzero().flatten()
        assert len(ends) >= 2  # several documents per row: the check has something to separate
        later = slice(int(ends[0]) + 1, None)
        after_first_end.append((row["plain"][later] - row["expected"][later]).abs().max())
        assert row["loss_mask"].tolist() == (row["tokens"] != EOD).float().tolist()
        assert row["position_ids"].tolist() == _positions_after_resets(row["tokens"])
    # One causal row over all documents gives other losses: the comparison above can fail.
    assert max(after_first_end) > 1e-3


def _eod_gaps(rows):
    """Distances between consecutive end-of-document tokens within the rows: the corpus's
    document length + 1 (its EOD)."""
    gaps = set()
    for row in rows:
        ends = (torch.as_tensor(row) == EOD).nonzero().flatten()
        gaps |= set(ends.diff().tolist())
    return gaps


def _validation_loss(trainer, dataset) -> float:
    """float64 mean loss of the first two global batches of ``dataset``, as evaluated."""
    import torch.nn.functional as F

    from megatron_slm.training.data import MicroBatches

    total, count = 0.0, 0.0
    peek = MicroBatches(dataset, trainer.cfg.training.micro_batch_size, 0)
    with torch.no_grad():
        for _ in range(2 * trainer.sizes.num_microbatches):
            batch = next(peek)
            logits = trainer.chunks[0](batch["tokens"], batch["position_ids"], None)
            loss = F.cross_entropy(
                logits.double().flatten(0, 1), batch["labels"].flatten(), reduction="none"
            )
            mask = batch["loss_mask"].flatten().double()
            total, count = total + float((loss * mask).sum()), count + float(mask.sum())
    return total / count


def _splits_worker(rank, world, train, valid, log_file):
    argv = tiny_args(train, log_file, 3, "--eval-interval", 3, "--eval-iters", 2)
    argv = [a for a in argv if a not in ("--data-path", train, "--split", "100,0,0")]
    argv += ["--train-data-path", train, "--valid-data-path", *valid, "--slm-ratio", "0.5"]
    trainer = cpu_trainer([*argv, "--multiple-validation-sets"])
    gbs = trainer.sizes.global_batch_size
    train_rows = [trainer.train_ds[i]["tokens"] for i in range(gbs)]
    train_refs = [trainer.train_ds[i]["ref_loss"] for i in range(gbs)]
    sets = {
        name: ([ds[i]["tokens"] for i in range(2 * gbs)], _validation_loss(trainer, ds))
        for name, ds in trainer.valid_sets
    }
    reported = trainer.evaluate()
    for _ in range(3):  # a selective step trains on the sidecar; step 3 evaluates and logs
        assert trainer.advance() is None
    close_trainer(trainer)
    finite = [bool(torch.isfinite(r).any()) for r in train_refs]
    gaps = {name: _eod_gaps(rows) for name, (rows, _) in sets.items()}
    expected = {name: loss for name, (_, loss) in sets.items()}
    return _eod_gaps(train_rows), gaps, finite, reported, expected


def test_validation_sets_of_their_own(corpora, tmp_path):
    """--train-data-path with two --valid-data-path datasets, --multiple-validation-sets: each
    set holds its own corpus's documents and has a loss of its own, logged by name."""
    log = tmp_path / "steps.jsonl"
    valid = [corpora["valid"], corpora["other"]]
    train_gaps, gaps, finite, reported, expected = run_distributed(
        _splits_worker, 1, corpora["train"], valid, str(log)
    )[0]
    names = ["valid_text_document", "other_text_document"]
    assert train_gaps == {16}  # each split reads its own corpus
    assert gaps == dict(zip(names, [{8}, {5}]))
    assert all(finite)  # the training blend carries its sidecar's losses
    assert list(reported) == names
    for name in names:
        assert reported[name] == pytest.approx(expected[name], rel=1e-5)
    assert abs(reported[names[0]] - reported[names[1]]) > 1e-3  # two sets, two losses
    records = [json.loads(line) for line in log.read_text().splitlines()]
    logged = [r["validation_losses"] for r in records if "validation_losses" in r]
    assert len(logged) == 1 and list(logged[0]) == names  # step 3's evaluation


def _final_evaluation_worker(rank, world, prefix, tmp):
    flags = ("--split", "80,10,10", "--eval-interval", 2, "--eval-iters", 2, "--num-workers", 0)
    trainer = cpu_trainer([*tiny_args(prefix, f"{tmp}/a.jsonl", 3, *flags), "--save", f"{tmp}/c"])
    ((_, valid),), ((_, test),) = trainer.valid_sets, trainer.test_sets
    trainer.train()  # validation at step 2; after step 3: validation and the test split
    expected = {
        "validation": _validation_loss(trainer, valid),
        "test": _validation_loss(trainer, test),
    }
    flags += ("--load", f"{tmp}/c", "--skip-train")
    cpu_trainer(tiny_args(prefix, f"{tmp}/b.jsonl", 3, *flags)).train()  # step 3's, no training
    return expected


def test_after_training_the_validation_and_test_splits_are_evaluated(corpora, tmp_path):
    """Megatron-LM's end of training: the validation sets again (step 3, not an --eval-interval
    step) and the test split, each loss that of its first --eval-iters batches recomputed in
    float64; --skip-train evaluates both at the --load step and trains nothing, saves nothing."""
    from megatron_slm.checkpoint import latest_iteration

    expected = run_distributed(_final_evaluation_worker, 1, corpora["train"], str(tmp_path))[0]
    a, b = ([json.loads(line) for line in (tmp_path / f).read_text().splitlines()]
            for f in ("a.jsonl", "b.jsonl"))  # fmt: skip
    valid = [(r["iteration"], r["validation_loss"]) for r in a if "validation_loss" in r]
    test = [(r["iteration"], r["test_loss"]) for r in a if "test_loss" in r]
    assert [i for i, _ in valid] == [2, 3] and [i for i, _ in test] == [3]
    assert valid[-1][1] == pytest.approx(expected["validation"], rel=1e-5)
    assert test[0][1] == pytest.approx(expected["test"], rel=1e-5)
    assert abs(test[0][1] - valid[-1][1]) > 1e-4  # two splits, two losses
    assert [r for r in b if "loss" in r] == []  # nothing trained
    assert b == [
        {"iteration": 3, "validation_loss": valid[-1][1]},
        {"iteration": 3, "test_loss": test[0][1]},
    ]
    assert latest_iteration(str(tmp_path / "c")) == 3


def _config(*argv):
    cfg = parse_config([str(a) for a in argv])
    from megatron_slm.models.presets import get_preset

    return validate(cfg, 1, get_preset("tiny"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--data-path", "A", "--train-data-path", "B"), "either --data-path"),
        (("--valid-data-path", "B"), "need --train-data-path"),
        (("--train-data-path", "A", "--train-samples-from", "l.json"), "--train-samples-from"),
        (("--data-path", "A", "--reset-attention-mask", "--transformer-impl", "te"), "use --trans"),
        (("--sft-data", "x.jsonl", "--eod-mask-loss"), "--sft-data rows already"),
        (("--sft-data", "x.jsonl", "--train-data-path", "A"), "--train-data-path or --sft-data"),
        (
            ("--data-path", "0.5", "A", "0.5", "B", "--full-validation"),
            "a weighted --data-path blend has not",
        ),
        (("--mock-data", "--full-validation"), "--full-validation with --mock-data"),
    ],
)
def test_conflicting_data_flags_are_refused(argv, message, capsys):
    """One line naming the flags: from the parser (exit 2) or from the cross-group checks."""
    with pytest.raises((ConfigError, SystemExit)) as err:
        _config(
            *argv,
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            VOCAB_FLAG,
            "--train-iters",
            2,
        )
    if isinstance(err.value, SystemExit):
        assert err.value.code == 2
        text = capsys.readouterr().err
    else:
        text = str(err.value)
    assert message in text


def test_blends_read_from_files_are_the_flags_blends(tmp_path):
    """Megatron-LM's --data-args-path (the --data-path string) and --per-split-data-args-path
    (JSON per split) give the configuration of the same blends given as flags."""
    base = ["--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB_FLAG, "--train-iters", 2]
    blend = ["0.3", "data/a_text_document", "0.7", "data/b_text_document"]  # --data-path's list
    text = tmp_path / "blend.txt"
    text.write_text(" 0.3 data/a_text_document\n0.7\tdata/b_text_document\n")
    from_file = parse_config([str(a) for a in [*base, "--data-args-path", text]])
    assert from_file.data.data_path == blend
    assert from_file.data.train_blend == blend and from_file.data.blend_per_split() is None
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": [0.3, "data/a", 0.7, "data/b"], "valid": ["v"]}))
    from_json = parse_config([str(a) for a in [*base, "--per-split-data-args-path", splits]])
    flags = ["--train-data-path", "0.3", "data/a", "0.7", "data/b", "--valid-data-path", "v"]
    given = parse_config([str(a) for a in [*base, *flags]]).data.blend_per_split()
    assert from_json.data.blend_per_split() == given
    assert given == [["0.3", "data/a", "0.7", "data/b"], ["v"], None]


@pytest.mark.parametrize(
    "content, extra, message",
    [
        (None, (), "cannot read (No such file or directory)"),
        ("{", (), "not JSON"),
        ('["a"]', (), 'keys among "train", "valid" and "test"'),
        ('{"train": "a b"}', (), '"train" must be a list'),
        ('{"valid": ["v"]}', (), 'no "train" blend'),
        ('{"train": ["a"]}', ("--data-path", "x"), "replaces --data-path"),
    ],
)
def test_a_blend_file_that_does_not_fit_is_one_line(tmp_path, capsys, content, extra, message):
    path = tmp_path / "splits.json"
    if content is not None:
        path.write_text(content)
    argv = ["--tokenizer-type", "NullTokenizer", "--train-iters", 2, *extra]
    with pytest.raises(SystemExit) as err:
        parse_config([str(a) for a in [*argv, "--per-split-data-args-path", path]])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert f"--per-split-data-args-path {path}" in lines[-1] or "replaces" in lines[-1]
    assert message in lines[-1]


def _full_validation_worker(rank, world, prefix, tmp):
    """This rank's view of one --full-validation evaluation: the reported loss, the split's
    samples, and (one rank) the float64 mean over every sample the evaluation reads."""
    import torch.nn.functional as F

    flags = ("--split", "70,30,0", "--full-validation", "--eval-iters", 0, "--micro-batch-size", 1,
             "--num-workers", 0)  # fmt: skip
    trainer = cpu_trainer(tiny_args(prefix, f"{tmp}/{world}.jsonl", 3, *flags), world=world)
    ((_, valid),) = trainer.valid_sets
    reported = [trainer.evaluate()[""] for _ in range(2)]  # (the second: the same samples)
    expected = None
    if world == 1:
        total, count = 0.0, 0.0
        with torch.no_grad():
            for i in range(len(valid)):
                sample = {k: torch.as_tensor(v)[None] for k, v in valid[i].items()}
                logits = trainer.chunks[0](sample["tokens"], sample["position_ids"], None)
                loss = F.cross_entropy(logits[0].double(), sample["labels"][0], reduction="none")
                mask = sample["loss_mask"][0].double()
                total, count = total + float((loss * mask).sum()), count + float(mask.sum())
        expected = total / count
    close_trainer(trainer)
    eods = sum(int((torch.as_tensor(valid[i]["tokens"]) == EOD).sum()) for i in range(len(valid)))
    return reported, expected, len(valid), eods


def test_full_validation_reads_the_whole_split_each_time(corpora, tmp_path):
    """--full-validation (Megatron-LM's flag): the validation split is built as one epoch (its
    30 documents of 16 tokens: 14 samples of 32 + 1, reading 28 documents' ends once, the rest
    too short for a sample), and each
    evaluation's loss is the mean over all of it, the same at every evaluation and at DP 2
    (7 micro-batches per rank: a whole global batch of 4, then a partial one of 3)."""
    ((reported, expected, n, eods),) = run_distributed(
        _full_validation_worker, 1, corpora["train"], str(tmp_path)
    )
    assert n == (30 * 16 - 1) // 32 and eods == n * 32 // 16  # (every document read once)
    assert reported[0] == pytest.approx(expected, rel=1e-6) and reported[1] == reported[0]
    two = run_distributed(_full_validation_worker, 2, corpora["train"], str(tmp_path))
    for reported_dp, _, _, _ in two:
        assert reported_dp == pytest.approx(reported, rel=1e-6)
