"""The compact-tokenizer path as a user runs it: train a 1000-piece tokenizer, tokenize the sample,
train a tiny model, ``count`` (2 workers, with the coverage curve), ``prune`` to 600 pieces (and
by ``--coverage``), ``remap-checkpoint`` at TP=1, TP=2 and PP=2 (torchrun). The remapped
checkpoints' logits equal the original's at the kept ids (1e-5), evaluated at TP=1 and TP=2, on a
text both tokenizers split the same way. Bad inputs fail with one line and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from tests import zygote
from tests.dist_helpers import free_port
from tests.functional.pretrain_helpers import run_pretrain

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(REPO, "examples", "sample_data", "clean.jsonl")
TOOL = os.path.join(REPO, "tools", "compact_tokenizer.py")
TRAIN = [
    "--model-preset", "tiny", "--seq-length", 64, "--micro-batch-size", 2,
    "--global-batch-size", 4, "--lr", "3e-3", "--eval-interval", 0, "--log-interval", 1,
    "--split", "100,0,0",
]  # fmt: skip
N_SMALL = 600


def _run(script, *args, nproc=1, check=True):
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        cmd += ["--master-port", str(free_port())]
    cmd += [script, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    proc = zygote.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _tool(*args, **kw):
    return _run(TOOL, *args, **kw)


def _fails(*args, match: str):
    proc = _tool(*args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and match in last, proc.stderr
    return last


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("compact")
    big = str(root / "big")
    _run(os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", SAMPLE,
         "--model-prefix", big, "--vocab-size", 1000)  # fmt: skip
    big += ".model"
    _run(os.path.join(REPO, "tools", "preprocess_data.py"), "--input", SAMPLE,
         "--output-prefix", root / "clean", "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", big, "--append-eod")  # fmt: skip
    prefix = str(root / "clean_text_document")
    ref = str(root / "ref")
    run_pretrain(["--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer",
                  "--tokenizer-model", big, *TRAIN, "--train-iters", 6, "--save", ref])  # fmt: skip
    heldout = str(root / "heldout.jsonl")
    with open(SAMPLE) as f, open(heldout, "w") as out:
        out.writelines(f.readlines()[-20:])
    counts = str(root / "counts.npy")
    count = _tool("count", "--data-path", prefix, "--tokenizer-model", big, "--output", counts,
                  "--workers", 2, "--heldout", heldout)  # fmt: skip
    small = str(root / "small.model")
    proc = _tool("prune", "--tokenizer-model", big, "--counts", counts, "--vocab-size", N_SMALL,
                 "--output", small, "--heldout", heldout, "--hidden-size", 64)  # fmt: skip
    idmap = str(root / "small.idmap.json")
    remapped = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        remapped[tp, pp] = str(root / f"small_tp{tp}_pp{pp}")
        _tool("remap-checkpoint", "--load", ref, "--id-map", idmap, "--save", remapped[tp, pp],
              "--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp,
              nproc=tp * pp)  # fmt: skip
    return dict(root=root, big=big, prefix=prefix, ref=ref, counts=counts, small=small,
                idmap=idmap, remapped=remapped, prune_stdout=proc.stdout,
                count_stdout=count.stdout)  # fmt: skip


def test_count_matches_dataset(pipeline):
    from megatron_slm.data.indexed import IndexedDataset

    counts = np.load(pipeline["counts"])
    with open(pipeline["counts"][:-4] + ".json") as f:
        meta = json.load(f)
    ds = IndexedDataset(pipeline["prefix"])
    want = np.bincount(np.concatenate([ds[i] for i in range(len(ds))]), minlength=1000)
    assert np.array_equal(counts, want)
    assert meta["tokenizer"]["model"] == pipeline["big"] and meta["tokenizer"]["vocab_size"] == 1000


def test_prune_outputs(pipeline):
    import sentencepiece as spm

    big = spm.SentencePieceProcessor(model_file=pipeline["big"])
    small = spm.SentencePieceProcessor(model_file=pipeline["small"])
    with open(pipeline["idmap"]) as f:
        idmap = json.load(f)
    new_to_old = idmap["new_to_old"]
    assert small.get_piece_size() == N_SMALL == len(new_to_old)
    assert [small.id_to_piece(i) for i in range(N_SMALL)] == [
        big.id_to_piece(o) for o in new_to_old
    ]
    with open(pipeline["small"][:-6] + ".report.json") as f:
        report = json.load(f)
    assert report["unreachable_kept"] == [] and 0.5 < report["coverage"] <= 1
    h = report["heldout"]
    assert h["after"]["tokens"] >= h["before"]["tokens"] and h["documents"] == 20
    assert report["embedding_parameters"]["saved"] == 2 * (1024 - 640) * 64
    assert "every kept piece is reachable" in pipeline["prune_stdout"]


def test_coverage_curve_and_prune_by_coverage(pipeline, tmp_path):
    """``count`` printed the coverage curve (table, JSON, PNG); ``prune --coverage 0.995`` keeps
    the N it shows, the smallest whose kept pieces cover 99.5% of the counted tokens."""
    from megatron_slm.tinylm import spm
    from megatron_slm.tinylm.coverage import curve_table
    from megatron_slm.tinylm.prune import Ranking

    with open(pipeline["counts"][:-4] + ".coverage.json") as f:
        curve = json.load(f)
    assert curve_table(curve) in pipeline["count_stdout"]
    assert os.path.getsize(pipeline["counts"][:-4] + ".coverage.png") > 1000
    n = curve["targets"]["0.995"]
    row = next(r for r in curve["rows"] if r["vocab_size"] == n)
    assert row["coverage"] >= 0.995 and row["targets"] == [0.995]
    out = str(tmp_path / "cov.model")
    proc = _tool("prune", "--tokenizer-model", pipeline["big"], "--counts", pipeline["counts"],
                 "--coverage", 0.995, "--output", out)  # fmt: skip
    assert f"--coverage 0.995: N = {n}," in proc.stdout
    with open(tmp_path / "cov.report.json") as f:
        report = json.load(f)
    assert report["pieces"]["after"] == n and report["coverage"] == row["coverage"]
    counts = np.load(pipeline["counts"])
    ranking = Ranking(spm.load_model_proto(pipeline["big"]), counts)
    assert ranking.coverage(n - 1) < 0.995 <= ranking.coverage(n)


def _same_tokenization_ids(pipeline, new_to_old):
    """New ids of a held-out text that the big and the small model split identically."""
    import sentencepiece as spm

    big = spm.SentencePieceProcessor(model_file=pipeline["big"])
    small = spm.SentencePieceProcessor(model_file=pipeline["small"])
    with open(SAMPLE) as f:
        words = " ".join(json.loads(line)["text"] for line in f.readlines()[-20:]).split()
    chosen = [w for w in words if [new_to_old[i] for i in small.encode(w)] == big.encode(w)]
    text = " ".join(chosen[:40])
    new, old = small.encode(text), big.encode(text)
    assert [new_to_old[i] for i in new] == old and len(new) >= 30
    return np.array(new), np.array(old)


def test_remapped_logits_equal_at_kept_ids(pipeline):
    with open(pipeline["idmap"]) as f:
        new_to_old = json.load(f)["new_to_old"]
    new_ids, old_ids = _same_tokenization_ids(pipeline, new_to_old)
    root = pipeline["root"]
    np.save(root / "old_ids.npy", old_ids)
    np.save(root / "new_ids.npy", new_ids)
    worker = os.path.join(REPO, "tests", "functional", "tinylm_logits_worker.py")
    _run(worker, pipeline["ref"], root / "old_ids.npy", root / "old.npy")
    old = np.load(root / "old.npy")[:, new_to_old]
    assert old.shape == (len(old_ids), N_SMALL)
    # Remapped at TP=1, TP=2 and PP=2, each read at TP=1, and the TP=1 one at TP=2 as well.
    for saved, eval_tp in (((1, 1), 1), ((1, 1), 2), ((2, 1), 1), ((1, 2), 1)):
        out = root / f"new_{saved[0]}_{saved[1]}_{eval_tp}.npy"
        _run(worker, pipeline["remapped"][saved], root / "new_ids.npy", out, nproc=eval_tp)
        new = np.load(out)
        assert new.shape == old.shape
        assert np.abs(new - old).max() <= 1e-5, (saved, eval_tp, np.abs(new - old).max())


def test_remapped_metadata(pipeline):
    from megatron_slm.checkpoint import read_checkpoint

    for (tp, pp), padded in (((1, 1), 640), ((2, 1), 768), ((1, 2), 640)):
        info = read_checkpoint(pipeline["remapped"][tp, pp])
        assert info.model.vocab_size == N_SMALL and info.padded_vocab_size == padded
        assert info.tokenizer["model"] == pipeline["small"]
        assert info.tokenizer["vocab_size"] == N_SMALL
        assert info.meta["tensor_model_parallel_size"] == tp
        assert info.meta["pipeline_model_parallel_size"] == pp
        assert info.meta["model_args"] == read_checkpoint(pipeline["ref"]).meta["model_args"]


def test_bad_inputs(pipeline, tmp_path):
    big, counts, small = pipeline["big"], pipeline["counts"], pipeline["small"]
    out = str(tmp_path / "x.model")
    _fails("prune", "--tokenizer-model", big, "--counts", counts, "--vocab-size", 100,
           "--output", out, match="--vocab-size 100 is smaller than the 260 pieces")  # fmt: skip
    # Counts of another tokenizer: length mismatch, then same length but another model file.
    _fails("prune", "--tokenizer-model", small, "--counts", counts, "--vocab-size", 300,
           "--output", out, match="the counts have 1000 ids")  # fmt: skip
    other = str(tmp_path / "other.npy")
    np.save(other, np.load(counts))
    with open(counts[:-4] + ".json") as f:
        meta = json.load(f)
    meta["tokenizer"]["sha256"] = "0" * 16
    with open(other[:-4] + ".json", "w") as f:
        json.dump(meta, f)
    _fails("prune", "--tokenizer-model", big, "--counts", other, "--vocab-size", 300,
           "--output", out, match="counted with tokenizer")  # fmt: skip
    # A tokenizer type that cannot be pruned.
    _fails("prune", "--tokenizer-model", big, "--tokenizer-type", "HuggingFaceTokenizer",
           "--counts", counts, "--vocab-size", 300, "--output", out,
           match="--tokenizer-type HuggingFaceTokenizer cannot be pruned")  # fmt: skip
    # An id map that does not fit the checkpoint: made for another vocabulary, or corrupted.
    with open(pipeline["idmap"]) as f:
        obj = json.load(f)
    obj["old_tokenizer"]["vocab_size"] = 1200
    bad = tmp_path / "bad.idmap.json"
    bad.write_text(json.dumps(obj))
    _fails("remap-checkpoint", "--load", pipeline["ref"], "--id-map", bad, "--save",
           tmp_path / "c", match="the id map does not fit the checkpoint")  # fmt: skip
    obj["old_tokenizer"]["vocab_size"] = 1000
    obj["new_to_old"][-1] = 1000
    bad.write_text(json.dumps(obj))
    _fails("remap-checkpoint", "--load", pipeline["ref"], "--id-map", bad, "--save",
           tmp_path / "c", match="old ids must lie in [0, 1000)")  # fmt: skip
    _fails("count", "--data-path", pipeline["prefix"], "--tokenizer-model", small,
           "--output", tmp_path / "c.npy", match="the tokenizer has only 600 ids")  # fmt: skip


def test_retokenize_and_train_from_remapped_weights(pipeline):
    """The README's last steps: the corpus re-tokenized with the small model, training continued
    from the remapped weights (--finetune) with the small tokenizer the checkpoint records."""
    from tests.functional.pretrain_helpers import read_steps

    root = pipeline["root"]
    _run(os.path.join(REPO, "tools", "preprocess_data.py"), "--input", SAMPLE,
         "--output-prefix", root / "small", "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", pipeline["small"], "--append-eod")  # fmt: skip
    first_loss = {}
    for name, extra in (("remapped", ["--load", pipeline["remapped"][1, 1], "--finetune"]),
                        ("scratch", [])):  # fmt: skip
        log = root / f"train_{name}.jsonl"
        run_pretrain(["--data-path", root / "small_text_document", "--tokenizer-type",
                      "SentencePieceTokenizer", "--tokenizer-model", pipeline["small"], *TRAIN,
                      "--train-iters", 1, "--log-loss-file", log, *extra])  # fmt: skip
        (step,) = read_steps(str(log))
        first_loss[name] = step["loss"]
    # The remapped weights carry what the model learned: better than a fresh initialisation.
    assert first_loss["remapped"] < first_loss["scratch"] - 0.1, first_loss
