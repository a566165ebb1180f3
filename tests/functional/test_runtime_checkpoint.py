"""Self-describing checkpoints and the one model runtime, as a user drives them: a reference model
trained with a 1000-piece sentencepiece tokenizer is scored, evaluated, exported and used as the
online reference, each tool given only ``--load`` plus data paths, at TP=1 and TP=2 (torchrun), with
equal results across TP. Then: a vocabulary that needs padding at TP=2 (48,000 ids, saved at TP=2
with 48,128 rows, scored at TP=1 and TP=2), flags that contradict the checkpoint, the trainer's own
model flags passed to the scorer, a checkpoint written before this metadata existed, and one writer
per output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests import zygote
from tests.dist_helpers import free_port
from tests.functional.pretrain_helpers import make_null_corpus, read_steps, run_pretrain

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(REPO, "examples", "sample_data", "clean.jsonl")
TRAIN = [
    "--model-preset", "tiny", "--seq-length", 64, "--micro-batch-size", 2,
    "--global-batch-size", 4, "--lr", "3e-3", "--eval-interval", 0, "--log-interval", 1,
    "--split", "100,0,0",
]  # fmt: skip


def _tool(name, *args, nproc=1, check=True):
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        cmd += ["--master-port", str(free_port())]
    cmd += [os.path.join(REPO, "tools", name), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    proc = zygote.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _sidecar(prefix) -> np.ndarray:
    from megatron_slm.data.sidecar import SidecarReader, decode_values

    reader = SidecarReader(prefix)
    return decode_values(np.asarray(reader.values), reader.dtype).astype(np.float64)


def _score(prefix, load, tp, *extra):
    """Sidecar values of ``prefix`` scored at TP=tp (fp32 storage, so TP differences show)."""
    for suffix in ("_refloss.bin", "_refloss.json"):
        if os.path.exists(prefix + suffix):
            os.remove(prefix + suffix)
    _tool(
        "score_corpus.py", "--data-prefix", prefix, "--load", load, "--dtype", "float32",
        "--tensor-model-parallel-size", tp, *extra, nproc=tp,
    )  # fmt: skip
    return _sidecar(prefix)


def _assert_close(a: np.ndarray, b: np.ndarray, tol=1e-5):
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(a)
    assert np.abs(a[ok] - b[ok]).max() <= tol, np.abs(a[ok] - b[ok]).max()


@pytest.fixture(scope="module")
def sp_setup(tmp_path_factory):
    """A 1000-piece sentencepiece tokenizer, the clean sample tokenized with it, a reference
    model trained on it at TP=1 (the tiny preset's own vocabulary is 512)."""
    root = tmp_path_factory.mktemp("runtime")
    tok = str(root / "tok")
    _tool("train_tokenizer.py", "--input", SAMPLE, "--model-prefix", tok, "--vocab-size", 1000)
    _tool(
        "preprocess_data.py", "--input", SAMPLE, "--output-prefix", root / "clean",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok + ".model",
        "--append-eod",
    )  # fmt: skip
    prefix = str(root / "clean_text_document")
    ref = str(root / "ref")
    tok_args = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok + ".model"]
    run_pretrain(["--data-path", prefix, *tok_args, *TRAIN, "--train-iters", 8, "--save", ref])
    heldout = str(root / "heldout.jsonl")
    with open(SAMPLE) as f, open(heldout, "w") as out:
        out.writelines(f.readlines()[-20:])
    return dict(root=root, prefix=prefix, ref=ref, tok=tok + ".model", heldout=heldout)


def test_checkpoint_records_itself(sp_setup):
    from megatron_slm.checkpoint import read_checkpoint

    info = read_checkpoint(sp_setup["ref"])
    assert info.model.vocab_size == 1000 and info.padded_vocab_size == 1024
    assert info.meta["model_args"] == {"model_preset": "tiny", "overrides": {}}
    tok = info.tokenizer
    assert tok["type"] == "SentencePieceTokenizer" and tok["vocab_size"] == 1000
    assert tok["model"] == os.path.abspath(sp_setup["tok"]) and len(tok["sha256"]) == 16
    assert info.meta["tensor_model_parallel_size"] == 1 and info.meta["params_dtype"] == "float32"


def test_score_evaluate_export_with_load_only_equal_across_tp(sp_setup):
    prefix, ref = sp_setup["prefix"], sp_setup["ref"]
    tp1 = _score(prefix, ref, 1)
    tp2 = _score(prefix, ref, 2)
    _assert_close(tp1, tp2)
    # The trainer's own model flags (a shared MODEL_ARGS) are accepted and change nothing.
    _assert_close(_score(prefix, ref, 1, "--model-preset", "tiny", "--num-layers", 4), tp1, 0)

    reports = {}
    for tp in (1, 2):
        out = sp_setup["root"] / f"eval_tp{tp}.json"
        _tool(
            "evaluate.py", "--load", ref, "--perplexity-data", sp_setup["heldout"],
            "--tensor-model-parallel-size", tp, "--output", out, nproc=tp,
        )  # fmt: skip
        reports[tp] = json.load(open(out))["perplexity"][0]
    assert reports[1]["tokens"] == reports[2]["tokens"] > 0
    assert reports[2]["mean_loss"] == pytest.approx(reports[1]["mean_loss"], abs=1e-5)

    hf = sp_setup["root"] / "hf"
    _tool("convert_checkpoint.py", "megatron-to-hf", "--load", ref, "--save", hf)
    config = json.load(open(hf / "config.json"))
    assert config["vocab_size"] == 1000
    # The export evaluated through Hugging Face weights gives the checkpoint's numbers.
    out = sp_setup["root"] / "eval_hf.json"
    _tool(
        "evaluate.py", "--load", hf, "--perplexity-data", sp_setup["heldout"], "--output", out,
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_setup["tok"],
        "--seq-length", 64,
    )  # fmt: skip
    hf_report = json.load(open(out))["perplexity"][0]
    assert hf_report["mean_loss"] == pytest.approx(reports[1]["mean_loss"], abs=1e-4)


def test_online_reference_from_load_only_equal_across_tp(sp_setup, tmp_path):
    losses = {}
    for tp in (1, 2):
        log = tmp_path / f"online_tp{tp}.jsonl"
        run_pretrain(
            [
                "--data-path", sp_setup["prefix"], "--tokenizer-type", "SentencePieceTokenizer",
                "--tokenizer-model", sp_setup["tok"], *TRAIN, "--train-iters", 3,
                "--slm-ratio", 0.6, "--slm-ref-source", "online", "--slm-ref-load",
                sp_setup["ref"], "--tensor-model-parallel-size", tp, "--log-loss-file", log,
            ],
            nproc=tp,
        )  # fmt: skip
        losses[tp] = read_steps(str(log))
    for a, b in zip(losses[1], losses[2]):
        assert a["n_selected"] == b["n_selected"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_contradicting_flags_fail_before_work(sp_setup, tmp_path):
    prefix, ref = sp_setup["prefix"], sp_setup["ref"]
    proc = _tool("score_corpus.py", "--data-prefix", prefix, "--load", ref,
                 "--hidden-size", 128, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "--hidden-size 128 contradicts" in proc.stderr and "(64)" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _tool("score_corpus.py", "--data-prefix", prefix, "--load", ref,
                 "--model-preset", "tinyllama-1.1b", check=False)  # fmt: skip
    assert proc.returncode == 2 and "--model-preset tinyllama-1.1b has --num-layers 22" in (
        proc.stderr
    )
    # Another tokenizer file (trained on other text): refused by its size or its hash.
    other = str(tmp_path / "other")
    _tool("train_tokenizer.py", "--input", sp_setup["heldout"], "--model-prefix", other,
          "--vocab-size", 1000)  # fmt: skip
    proc = _tool("evaluate.py", "--load", ref, "--perplexity-data", sp_setup["heldout"],
                 "--tokenizer-model", other + ".model", check=False)  # fmt: skip
    assert proc.returncode == 2 and "--tokenizer-model" in proc.stderr, proc.stderr[-2000:]
    assert "sha256" in proc.stderr or "recorded 1000" in proc.stderr
    proc = run_pretrain(
        ["--data-path", prefix, "--tokenizer-model", sp_setup["tok"], *TRAIN,
         "--train-iters", 9, "--load", ref, "--hidden-size", 96],
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "--hidden-size 96 contradicts" in proc.stderr


def test_checkpoint_from_before_the_metadata_loads(sp_setup, tmp_path):
    """A checkpoint written before this change: no model_args, no tokenizer hash, a relative
    tokenizer path; it still scores to the same values."""
    from megatron_slm.checkpoint import METADATA, read_checkpoint

    old = tmp_path / "old"
    shutil.copytree(sp_setup["ref"], old)
    meta_path = os.path.join(read_checkpoint(str(old)).path, METADATA)
    meta = json.load(open(meta_path))
    for key in ("model_args", "params_dtype"):
        meta.pop(key)
    meta["tokenizer"].pop("sha256")
    meta["tokenizer"]["model"] = os.path.relpath(meta["tokenizer"]["model"], REPO)
    json.dump(meta, open(meta_path, "w"))
    prefix = sp_setup["prefix"]
    _assert_close(_score(prefix, str(old), 1), _score(prefix, sp_setup["ref"], 1), 0)


def test_padded_vocabulary_kept_at_any_tp(tmp_path):
    """48,000 ids saved at TP=2: 48,128 rows (a multiple of 128 x 2). Scored, evaluated and used as
    the online reference at TP=1 and TP=2 (the rows are kept, not re-padded to 48,000 at TP=1),
    equal across TP; exported with the real vocabulary."""
    vocab = 48000
    prefix = make_null_corpus(str(tmp_path), "big", [40] * 12)  # ids < 511, NullTokenizer 512
    # Re-describe the same ids with a 48,000-id NullTokenizer (--vocab-size 47999, then its EOD).
    ckpt = str(tmp_path / "big_ref")
    run_pretrain(
        ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", vocab - 1,
         *TRAIN, "--train-iters", 2, "--tensor-model-parallel-size", 2, "--save", ckpt],
        nproc=2,
    )  # fmt: skip
    from megatron_slm.checkpoint import read_checkpoint
    from megatron_slm.models import padded_vocab_size

    info = read_checkpoint(ckpt)
    assert info.padded_vocab_size == 48128 and info.model.vocab_size == vocab
    assert padded_vocab_size(vocab, info.divisor_for(1), 1) == 48128  # not re-padded to 48,000
    _assert_close(_score(prefix, ckpt, 1), _score(prefix, ckpt, 2))
    losses = {}
    for tp in (1, 2):
        out = tmp_path / f"eval_tp{tp}.json"
        _tool(
            "evaluate.py", "--load", ckpt, "--perplexity-data", tmp_path / "big.jsonl",
            "--tensor-model-parallel-size", tp, "--output", out, nproc=tp,
        )  # fmt: skip
        losses[tp] = json.load(open(out))["perplexity"][0]["mean_loss"]
        log = tmp_path / f"online_tp{tp}.jsonl"
        run_pretrain(
            # The trained model is padded to 48,128 rows at both TP sizes (divisor 256), so the
            # two runs train the same model; the reference keeps its own rows.
            ["--data-path", prefix, "--vocab-size", vocab - 1, *TRAIN, "--train-iters", 2,
             "--slm-ratio", 0.5, "--slm-ref-source", "online", "--slm-ref-load", ckpt,
             "--make-vocab-size-divisible-by", 256, "--tensor-model-parallel-size", tp,
             "--log-loss-file", log],
            nproc=tp,
        )  # fmt: skip
        losses[f"online{tp}"] = [r["loss"] for r in read_steps(str(log))]
    assert losses[2] == pytest.approx(losses[1], abs=1e-5)
    assert losses["online2"] == pytest.approx(losses["online1"], abs=1e-5)
    _tool("convert_checkpoint.py", "megatron-to-hf", "--load", ckpt, "--save", tmp_path / "hf")
    assert json.load(open(tmp_path / "hf" / "config.json"))["vocab_size"] == vocab


def test_one_writer_per_output(sp_setup, tmp_path):
    """Two scorers on one prefix: the second fails at once naming the first (held stopped with
    SIGSTOP while it holds the lock, so the race is deterministic); the first then finishes with
    the bytes of a lone run."""
    import signal
    import time

    from megatron_slm.output_lock import read_holder

    prefix = str(tmp_path / "clean_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(sp_setup["prefix"] + ext, prefix + ext)
    lone = _score(sp_setup["prefix"], sp_setup["ref"], 1)
    args = ["--data-prefix", prefix, "--load", sp_setup["ref"], "--dtype", "float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    first = zygote.Popen(
        [sys.executable, os.path.join(REPO, "tools", "score_corpus.py"), *args],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while (read_holder(prefix + "_refloss.lock") or {}).get("pid") != first.pid:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first scorer never took the lock"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)
        second = _tool("score_corpus.py", *args, check=False)
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"pid {first.pid}" in second.stderr and "another job" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, err[-2000:]
    _assert_close(_sidecar(prefix), lone, 0)
