"""``--train-samples-from`` with batch ids outside the source order, as a user runs the trainer.

The source is the multiple-round corpus (``test_multi_round``): 96 samples, global batch 4, so
24 batches with ids 0..23. Before these checks, id 24 trained silently on samples 96..99 (past
the scored order), id -1 on the last batch, and id 10000000 crashed after step 1 with an
IndexError. Each bad list must now fail when the list is read: exit status 2, one ``error:``
line naming the file, the id and the valid range, no traceback, no step and nothing written
(no checkpoint, log, sample record, nor megatron-core index cache next to the data). A list of
ids 23 and 0 trains, on exactly those batches' samples.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests import zygote
from tests.functional.pretrain_helpers import REPO, run_pretrain
from tests.functional.test_bad_input import ENV, _snapshot
from tests.functional.test_multi_round import GBS, ROUND1, SEQ, _corpus, train_args

pytestmark = pytest.mark.slow
PROG = "python -m megatron_slm.pretrain"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The corpus and the source record of its training order (24 batches), built by the same
    library call ``tools/score_batches.py`` makes; megatron-core's index cache goes elsewhere."""
    from megatron_slm.data.sample_list import build_source_dataset, source_settings
    from megatron_slm.data.tokenizer import build_tokenizer
    from tests.functional.pretrain_helpers import VOCAB_FLAG

    root = tmp_path_factory.mktemp("batch-lists")
    data = root / "data"
    data.mkdir()
    prefix = _corpus(str(data))
    record = source_settings([prefix], "100,0,0", SEQ, 5, ROUND1 * GBS, GBS)
    tok = build_tokenizer("NullTokenizer", None, VOCAB_FLAG)
    _, record["batches"] = build_source_dataset([prefix], record, tok, str(root / "cache"))
    assert record["batches"] == ROUND1 == 24
    return {"root": root, "data": str(data), "prefix": prefix, "record": record}


def _write_list(path, source_record, batches) -> str:
    """A batch list as tools/resample_batches.py writes it, with the given (possibly bad) ids."""
    meta = {"format": "megatron-slm-batch-list", "version": 1, "source": source_record,
            "batches": batches, "draw": {"keep": 0.5}}  # fmt: skip
    with open(path, "w") as f:
        json.dump(meta, f)
    return str(path)


def _argv(source, out, blist, iters=2):
    args = train_args(source["prefix"], os.path.join(out, "loss.jsonl"), iters,
                      "--train-samples-from", blist, "--save", os.path.join(out, "ckpt"),
                      "--train-samples-record", os.path.join(out, "samples.jsonl"))  # fmt: skip
    return ["--device", "cpu", *map(str, args)]


def test_bad_batch_ids_exit_2_before_any_work(source, tmp_path):
    root, record = source["root"], source["record"]
    no_count = {k: v for k, v in record.items() if k != "batches"}
    cases = [  # (name, ids, source record, text the one error line must hold)
        ("past-the-end", [3, 24, 5], record, "batch id 24 (entry 1) is outside the source order"),
        ("negative", [-1, 2], record, "batch id -1 (entry 0) is outside the source order"),
        ("huge", [10000000], record, "batch id 10000000 (entry 0) is outside the source order"),
        ("not-an-integer", [1, 2.5], record, "batch id 2.5 (entry 1) is not an integer"),
        ("no-batch-count", [1, 2], no_count, "the source record has no batch count"),
    ]
    out = str(tmp_path / "out")  # no case may create it
    spec = []
    for name, ids, rec, _ in cases:
        blist = _write_list(root / f"{name}.idx", rec, ids)
        spec.append({"entry": "megatron_slm.pretrain", "argv": _argv(source, out, blist),
                     "cwd": REPO})  # fmt: skip
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    before = _snapshot(source["data"])
    zygote.run(
        [sys.executable, "-m", "tests.functional.bad_input_driver", "cases.json", "results.json"],
        cwd=tmp_path, env=ENV, check=True, timeout=300,
    )  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    for (name, _, _, expect), r in zip(cases, results):
        errors = [ln for ln in r["stderr"].splitlines() if ": error: " in ln]
        assert r["returncode"] == 2, f"{name}: exit {r['returncode']}\n{r['stderr'][-3000:]}"
        assert "Traceback" not in r["stderr"], f"{name}:\n{r['stderr'][-3000:]}"
        assert len(errors) == 1, f"{name}: {len(errors)} error lines\n{r['stderr'][-3000:]}"
        line = errors[0]
        assert line.startswith(f"{PROG}: error: --train-samples-from "), line
        assert str(root / f"{name}.idx") in line and expect in line, line
        if name not in ("not-an-integer", "no-batch-count"):
            assert "24 batches have ids 0..23" in line, line
    assert not os.path.exists(out), os.listdir(out)
    assert _snapshot(source["data"]) == before  # not even megatron-core's index cache


def test_boundary_ids_train_on_their_batches(source, tmp_path):
    """The valid range is not narrower than the order: ids 23 and 0 train, on samples 92..95
    then 0..3 of the source order (the trainer's sample record)."""
    blist = _write_list(tmp_path / "edge.idx", source["record"], [23, 0])
    out = str(tmp_path / "run")
    os.makedirs(out)
    argv = _argv(source, out, blist)[2:]  # run_pretrain adds --device cpu
    run_pretrain([*argv, "--data-cache-path", str(tmp_path / "cache")])
    with open(os.path.join(out, "samples.jsonl")) as f:
        recorded = [json.loads(line) for line in f]
    want = [[b * GBS + j for j in range(GBS)] for b in (23, 0)]
    assert [(r["iteration"], r["samples"]) for r in recorded] == list(zip((1, 2), want))
