"""Bad input as the user sees it: common mistakes against the trainer and every tool, run as real
processes. Each must exit with status 2, print no traceback, print exactly one line on stderr of
the form ``PROG: error: ...`` that names the flag or file at fault, and leave no output behind.
Under ``torchrun --nproc-per-node 2`` the line is printed once (rank 0 only).

The single-process cases are forked from one driver that imported torch and megatron-core once
(``tests/functional/bad_input_driver.py``): each case is still its own process running the entry
point's ``__main__`` and ``sys.exit``, at a few milliseconds instead of seconds of imports each.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

from megatron_slm.data.sidecar import sidecar_paths
from tests import zygote
from tests.dist_helpers import free_port
from tests.functional.pretrain_helpers import REPO, VOCAB_FLAG, make_null_corpus
from tests.unit.data import write_sidecar

PRETRAIN = "megatron_slm.pretrain"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def _tool(name: str) -> str:
    return os.path.join(REPO, "tools", f"{name}.py")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small valid inputs and the damaged copies the cases use."""
    d = tmp_path_factory.mktemp("bad-input")
    f = {"dir": str(d)}
    f["data"] = make_null_corpus(str(d), "good", [40, 50, 60, 30], seed=0)
    f["other"] = make_null_corpus(str(d), "other", [20, 25, 70], seed=1)
    write_sidecar(f["other"], lambda doc, p: np.where(p == 0, np.nan, 1.0), dtype="float16")
    # A sidecar copied from another dataset next to "good" (same names, other documents).
    f["mixed"] = make_null_corpus(str(d), "mixed", [40, 50, 60, 30], seed=2)
    for src, dst in zip(sidecar_paths(f["other"]), sidecar_paths(f["mixed"])):
        shutil.copy(src, dst)
    # Copies cut short or swapped.
    for name in ("trunc_bin", "trunc_idx", "swapped_bin", "garbage_idx"):
        for ext in (".bin", ".idx"):
            shutil.copy(f["data"] + ext, f"{d}/{name}{ext}")
        f[name] = f"{d}/{name}"
    os.truncate(f["trunc_bin"] + ".bin", os.path.getsize(f["data"] + ".bin") // 2)
    os.truncate(f["trunc_idx"] + ".idx", 40)
    shutil.copy(f["other"] + ".bin", f["swapped_bin"] + ".bin")
    with open(f["garbage_idx"] + ".idx", "wb") as fh:
        fh.write(b"this is not an index file at all, just text" * 3)
    f["notspm"] = str(d / "notspm.model")
    with open(f["notspm"], "w") as fh:
        fh.write("definitely not a sentencepiece model\n")
    f["jsonl"] = str(d / "docs.jsonl")
    with open(f["jsonl"], "w") as fh:
        fh.write('{"text": "1 2 3"}\n{"text": "4 5 6"}\n')
    f["malformed"] = str(d / "malformed.jsonl")
    with open(f["malformed"], "w") as fh:
        fh.write('{"text": "1 2 3"}\n{"text": "4 5\n{"text": "7"}\n')
    f["nokey"] = str(d / "nokey.jsonl")
    with open(f["nokey"], "w") as fh:
        fh.write('{"body": "1 2 3"}\n')
    # A checkpoint whose tracker names an iteration that was never written (a copy cut short).
    f["incomplete"] = str(d / "ckpt_incomplete")
    os.makedirs(f["incomplete"])
    with open(os.path.join(f["incomplete"], "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write("5")
    f["not_hf"] = str(d / "not_hf")
    os.makedirs(f["not_hf"])
    with open(os.path.join(f["not_hf"], "weights.txt"), "w") as fh:
        fh.write("nothing\n")
    f["out"] = str(d / "out")  # no case may create anything under it
    return f


def _pretrain_args(f, data, *extra):
    data = data if isinstance(data, list) else [data]
    return [
        "--device", "cpu", "--data-path", *data, "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(VOCAB_FLAG), "--model-preset", "tiny", "--seq-length", "32",
        "--micro-batch-size", "2", "--train-iters", "2", "--split", "100,0,0",
        "--save", f"{f['out']}/ckpt", "--log-loss-file", f"{f['out']}/loss.jsonl", *extra,
    ]  # fmt: skip


def _cases(f):
    """(id, entry, argv, text the one error line must contain)."""
    out = f["out"]
    P = PRETRAIN
    cases = [
        # --- trainer: data files
        ("pretrain-missing-prefix", P, _pretrain_args(f, f"{f['dir']}/nope"), "--data-path"),
        ("pretrain-truncated-bin", P, _pretrain_args(f, f["trunc_bin"]), "truncated at byte"),
        ("pretrain-truncated-idx", P, _pretrain_args(f, f["trunc_idx"]), "trunc_idx.idx"),
        ("pretrain-swapped-bin", P, _pretrain_args(f, f["swapped_bin"]), "swapped_bin.bin"),
        ("pretrain-garbage-idx", P, _pretrain_args(f, f["garbage_idx"]), "bad magic"),
        ("pretrain-blend-one-missing", P,
         _pretrain_args(f, ["0.5", f["data"], "0.5", f"{f['dir']}/gone"]), "gone.idx"),
        ("pretrain-dtype-vs-tokenizer", P,
         [*_pretrain_args(f, f["data"]), "--vocab-size", "70000"], "uint16"),
        ("pretrain-sidecar-other-dataset", P,
         _pretrain_args(f, f["mixed"], "--slm-ratio", "0.6"), "mixed_text_document_refloss"),
        ("pretrain-sidecar-missing", P,
         _pretrain_args(f, f["data"], "--slm-ratio", "0.6"), "sidecar"),
        # --- trainer: flags and checkpoints
        ("pretrain-ratio-out-of-range", P, _pretrain_args(f, f["data"], "--slm-ratio", "1.5"),
         "--slm-ratio"),
        ("pretrain-tp-not-dividing", P,
         _pretrain_args(f, f["data"], "--tensor-model-parallel-size", "3"),
         "--tensor-model-parallel-size"),
        ("pretrain-overlap-param-gather-alone", P,
         _pretrain_args(f, f["data"], "--overlap-param-gather"), "--overlap-param-gather needs"),
        ("pretrain-fully-reshardable-alone", P,
         _pretrain_args(f, f["data"], "--dist-ckpt-optim-fully-reshardable"),
         "--dist-ckpt-optim-fully-reshardable needs --use-distributed-optimizer"),
        ("pretrain-optimizer-instances-alone", P,
         _pretrain_args(f, f["data"], "--num-distributed-optimizer-instances", "2"),
         "--num-distributed-optimizer-instances needs --use-distributed-optimizer"),
        ("pretrain-optimizer-instances-not-dividing", P,
         _pretrain_args(f, f["data"], "--use-distributed-optimizer",
                        "--num-distributed-optimizer-instances", "2"),
         "--num-distributed-optimizer-instances 2 does not divide the data-parallel size 1"),
        ("pretrain-pad-buckets-alone", P,
         _pretrain_args(f, f["data"], "--ddp-pad-buckets-for-high-nccl-busbw"),
         "--ddp-pad-buckets-for-high-nccl-busbw needs --use-distributed-optimizer"),
        ("pretrain-buckets-two-ways", P,
         _pretrain_args(f, f["data"], "--ddp-num-buckets", "2", "--ddp-bucket-size", "9"),
         "give either --ddp-num-buckets or --ddp-bucket-size, not both"),
        ("pretrain-unknown-preset", P, [*_pretrain_args(f, f["data"]), "--model-preset", "nope"],
         "--model-preset"),
        ("pretrain-unknown-flag", P, _pretrain_args(f, f["data"], "--no-such-flag"),
         "--no-such-flag"),
        ("pretrain-bad-int", P, _pretrain_args(f, f["data"], "--micro-batch-size", "two"),
         "--micro-batch-size"),
        ("pretrain-incomplete-checkpoint", P,
         _pretrain_args(f, f["data"], "--load", f["incomplete"]), "incomplete checkpoint"),
        ("pretrain-missing-load", P, _pretrain_args(f, f["data"], "--load", f"{f['dir']}/nockpt"),
         "--load"),
        ("pretrain-corrupt-spm", P,
         [*_pretrain_args(f, f["data"]), "--tokenizer-type", "SentencePieceTokenizer",
          "--tokenizer-model", f["notspm"]], "notspm.model"),
        # --- preprocessing and tokenizer training
        ("preprocess-malformed-line", _tool("preprocess_data"),
         ["--input", f["malformed"], "--output-prefix", f"{out}/p", "--tokenizer-type",
          "NullTokenizer", "--vocab-size", "100"], "malformed.jsonl:2"),
        ("preprocess-missing-key", _tool("preprocess_data"),
         ["--input", f["nokey"], "--output-prefix", f"{out}/p", "--tokenizer-type",
          "NullTokenizer", "--vocab-size", "100"], "nokey.jsonl"),
        ("preprocess-no-input", _tool("preprocess_data"),
         ["--input", f"{f['dir']}/none*.jsonl", "--output-prefix", f"{out}/p", "--tokenizer-type",
          "NullTokenizer", "--vocab-size", "100"], "--input"),
        ("preprocess-corrupt-spm", _tool("preprocess_data"),
         ["--input", f["jsonl"], "--output-prefix", f"{out}/p", "--tokenizer-type",
          "SentencePieceTokenizer", "--tokenizer-model", f["notspm"]], "notspm.model"),
        ("train-tokenizer-missing-key", _tool("train_tokenizer"),
         ["--input", f["nokey"], "--model-prefix", f"{out}/tok", "--vocab-size", "20"],
         "nokey.jsonl"),
        ("train-tokenizer-vocab-too-small", _tool("train_tokenizer"),
         ["--input", f["jsonl"], "--model-prefix", f"{out}/tok", "--vocab-size", "20"],
         "--vocab-size 20 is too small for this text: sentencepiece needs at least 266"),
        # --- scorer
        ("score-no-checkpoint", _tool("score_corpus"),
         ["--data-prefix", f["data"], "--load", f"{f['dir']}/nockpt", "--device", "cpu"],
         "--load"),
        ("score-no-data", _tool("score_corpus"),
         ["--data-prefix", f"{f['dir']}/nope", "--load", f["incomplete"], "--device", "cpu"],
         "--data-prefix"),
        ("score-truncated-bin", _tool("score_corpus"),
         ["--data-prefix", f["trunc_bin"], "--load", f["incomplete"], "--device", "cpu"],
         "truncated at byte"),
        ("score-incomplete-checkpoint", _tool("score_corpus"),
         ["--data-prefix", f["data"], "--load", f["incomplete"], "--device", "cpu"],
         "incomplete checkpoint"),
        # --- evaluator
        ("evaluate-missing-data", _tool("evaluate"),
         ["--load", f["incomplete"], "--perplexity-data", f"{f['dir']}/missing.jsonl",
          "--device", "cpu", "--output", f"{out}/r.json"], "missing.jsonl"),
        ("evaluate-bad-lm-eval-metadata", _tool("evaluate"),
         ["--load", f["incomplete"], "--lm-eval-tasks", "qa_local", "--lm-eval-metadata", "{qa",
          "--device", "cpu"],
         "--lm-eval-metadata"),
        ("evaluate-truncated-data", _tool("evaluate"),
         ["--load", f["incomplete"], "--perplexity-data", f["trunc_bin"], "--device", "cpu"],
         "truncated at byte"),
        ("evaluate-nothing-to-do", _tool("evaluate"), ["--load", f["incomplete"]],
         "--perplexity-data"),
        # --- generation server
        ("server-bad-port", _tool("run_text_generation_server"),
         ["--load", f["incomplete"], "--port", "70000"], "--port"),
        ("server-incomplete-checkpoint", _tool("run_text_generation_server"),
         ["--load", f["incomplete"], "--device", "cpu"], "incomplete checkpoint"),
        # --- converter
        ("convert-not-hf", _tool("convert_checkpoint"),
         ["hf-to-megatron", "--load", f["not_hf"], "--save", f"{out}/conv"], "config.json"),
        ("convert-missing-megatron", _tool("convert_checkpoint"),
         ["megatron-to-hf", "--load", f["incomplete"], "--save", f"{out}/hf"],
         "incomplete checkpoint"),
        ("convert-no-direction", _tool("convert_checkpoint"),
         ["--load", f["not_hf"], "--save", f"{out}/conv"], "direction"),
        # --- tiny-LM and ProX tools
        ("compact-count-corrupt-spm", _tool("compact_tokenizer"),
         ["count", "--data-path", f["data"], "--tokenizer-model", f["notspm"],
          "--output", f"{out}/c.npy"], "notspm.model"),
        ("compact-prune-corrupt-spm", _tool("compact_tokenizer"),
         ["prune", "--tokenizer-model", f["notspm"], "--counts", f"{f['dir']}/c.npy",
          "--vocab-size", "10", "--output", f"{out}/s.model"], "notspm.model"),
        ("inherit-incomplete-checkpoint", _tool("inherit_parameters"),
         ["--load", f["incomplete"], "--save", f"{out}/small", "--model-preset", "tiny"],
         "incomplete checkpoint"),
        ("prox-apply-no-input", _tool("prox_refine"),
         ["apply", "--input", f"{f['dir']}/none*.jsonl", "--programs", f["jsonl"],
          "--output-dir", f"{out}/refined"], "--input"),
        ("inspect-corrupt-spm", _tool("inspect_sidecar"),
         ["--data-path", f["other"], "--top", "2", "--tokenizer-type", "SentencePieceTokenizer",
          "--tokenizer-model", f["notspm"]], "notspm.model"),
    ]  # fmt: skip
    return cases


def _check(case_id, expect, returncode, stderr, files):
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert returncode == 2, f"{case_id}: exit {returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, f"{case_id}: traceback\n{stderr[-3000:]}"
    assert len(errors) == 1, f"{case_id}: {len(errors)} error lines\n{stderr[-3000:]}"
    assert expect in errors[0], f"{case_id}: {expect!r} not in {errors[0]!r}"
    assert not os.path.exists(files["out"]), f"{case_id}: left {os.listdir(files['out'])}"
    return errors[0]


def test_bad_inputs_one_line_exit_2(files, tmp_path):
    cases = _cases(files)
    assert len(cases) >= 30
    before = _snapshot(files["dir"])
    spec = [{"entry": entry, "argv": argv, "cwd": REPO} for _, entry, argv, _ in cases]
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    zygote.run(
        [sys.executable, "-m", "tests.functional.bad_input_driver", "cases.json", "results.json"],
        cwd=tmp_path,
        env=dict(ENV, PYTHONPATH=f"{REPO}:{tmp_path}"),
        check=True,
        timeout=300,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    slow = sorted(((r["seconds"], c[0]) for c, r in zip(cases, results)), reverse=True)[:5]
    print("slowest cases:", ", ".join(f"{n} {s:.2f}s" for s, n in slow))
    failures = []
    for (case_id, _, _, expect), r in zip(cases, results):
        try:
            _check(case_id, expect, r["returncode"], r["stderr"], files)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n\n".join(failures)
    # Nothing written next to the inputs either (locks, caches, partial sidecars, directories).
    assert _snapshot(files["dir"]) == before


def _snapshot(root: str) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(d, n), root): os.path.getsize(os.path.join(d, n))
        for d, dirs, names in os.walk(root)
        for n in names + dirs
    }


def test_torchrun_prints_the_line_once(files):
    """Both ranks fail the same check; only rank 0 prints. (One case: each torchrun run costs
    three interpreters importing torch.)"""
    argv = _pretrain_args(files, files["trunc_bin"], "--tensor-model-parallel-size", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(free_port()), "-m", PRETRAIN, *argv]
    proc = zygote.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    both = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [ln for ln in both.splitlines() if ": error: " in ln]
    assert len(errors) == 1, both[-4000:]
    assert errors[0].startswith("python -m megatron_slm.pretrain: error: --data-path ")
    assert "trunc_bin.bin is truncated at byte" in errors[0]
    assert "[rank1]" not in both and "[rank0]" not in both, both[-4000:]
    # torchrun reports its failed children with a traceback of its own; no frame is ours.
    frames = [ln for ln in both.splitlines() if ln.strip().startswith('File "')]
    assert not [ln for ln in frames if "megatron_slm" in ln or "/tools/" in ln], both[-4000:]
    assert not os.path.exists(files["out"])
