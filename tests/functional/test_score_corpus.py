"""tools/score_corpus.py end to end on a tiny reference model (real gloo processes, CPU).

- Exactness: the sidecar equals the per-token losses of a plain one-document-at-a-time forward of
  the same model (fp32, 1e-5), with sliding windows on documents longer than the sequence length,
  at TP=1, TP=2, DP=2 (length-sorted batching, the PP=1 default) and with packed rows
  (block-diagonal masks) at TP=1 and PP=2.
- Resume: the CLI SIGKILLed at three different moments (a hook in the scorer), rerun each time:
  the published bytes equal the uninterrupted run's.
- Bad input: missing checkpoint / data prefix, vocabulary smaller than the data's largest id
  (the tokenizer's, and an id in the data found while scoring), corrupted progress file, existing
  output.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

from tests import zygote
from tests.dist_helpers import run_distributed
from tests.unit.data import write_token_dataset

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ, STRIDE, MBS, INTERVAL, VOCAB = 32, 12, 2, 5, 512
TOL = 1e-5


def _docs() -> list[list[int]]:
    rng = np.random.default_rng(7)
    lengths = list(rng.integers(2, 30, size=16)) + [1, 1, 33, 34, 57, 80, 121]
    rng.shuffle(lengths)
    return [list(rng.integers(0, VOCAB - 1, size=int(n))) for n in lengths]


DOCS = _docs()


# ---------------------------------------------------------------------------------------------
# workers (run in spawned processes)
# ---------------------------------------------------------------------------------------------
def make_reference(rank, world, root):
    from megatron_slm import launch
    from megatron_slm.checkpoint import save_checkpoint
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset

    launch.initialize(device="cpu", seed=99)
    cfg = get_preset("tiny")
    chunks = build_model(cfg, ModelBuildOptions(transformer_impl="torch"))
    meta = {
        "tokenizer": {"type": "NullTokenizer", "model": None, "vocab_size": VOCAB},
        "make_vocab_size_divisible_by": 128,
    }
    save_checkpoint(root, 1, chunks, model_config=cfg, metadata=meta)


def plain_losses(rank, world, ckpt, docs, seq, stride):
    """Per-token losses of each document alone (NaN at 0); documents longer than ``seq`` inputs
    are scored window by window: windows of ``seq`` inputs at 0, stride, 2*stride, ... (the last
    one cut at the document's end), each token by the first window that predicts it."""
    import torch
    import torch.nn.functional as F

    from megatron_slm import launch
    from megatron_slm.checkpoint import load_checkpoint
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset

    launch.initialize(device="cpu")
    (model,) = build_model(get_preset("tiny"), ModelBuildOptions(transformer_impl="torch"))
    load_checkpoint(ckpt, [model], weights_only=True)
    model.eval()

    def forward(ids):  # [n] -> [n - 1] losses of ids[1:]
        x = torch.tensor(ids[:-1])[None]
        with torch.no_grad():
            logits = model(x, torch.arange(x.shape[1])[None], None)  # [1, n - 1, v]
        return F.cross_entropy(logits[0].float(), torch.tensor(ids[1:]), reduction="none").numpy()

    out, contexts = [], []
    for doc in docs:
        n = len(doc)
        values = np.full(n, np.nan, dtype=np.float32)
        context = np.zeros(n, dtype=np.int64)
        if n - 1 <= seq:
            if n > 1:
                values[1:] = forward(doc)
                context[1:] = np.arange(1, n)
        else:
            done, s = 0, 0  # last position scored, window start
            while done < n - 1:
                window = doc[s : s + seq + 1]  # inputs s .. s+seq-1 predict positions s+1 ..
                losses = forward(window)
                for i in range(done + 1, s + len(window)):
                    values[i] = losses[i - s - 1]
                    context[i] = i - s
                done = s + len(window) - 1
                s += stride
        out.append(values)
        contexts.append(context)
    return out, contexts


def prepare(rank, world, ckpt, docs, tp1_kwargs, rows_kwargs):
    """One process: the reference checkpoint, the plain losses, the TP=1 sidecars (default
    length-sorted batching, and packed rows with block-diagonal masks)."""
    make_reference(rank, world, ckpt)
    expected = plain_losses(rank, world, ckpt, docs, SEQ, STRIDE)
    return expected, run_scorer(rank, world, tp1_kwargs), run_scorer(rank, world, rows_kwargs)


def _init(kwargs):
    from megatron_slm import launch

    launch.initialize(
        device="cpu",
        tensor_model_parallel_size=kwargs.get("tensor_model_parallel_size", 1),
        pipeline_model_parallel_size=kwargs.get("pipeline_model_parallel_size", 1),
    )


def run_scorer(rank, world, kwargs):
    from megatron_slm.scoring import ScoreConfig, score_corpus

    _init(kwargs)
    reports = score_corpus(ScoreConfig(**kwargs))
    return [r.__dict__ for r in reports]


def scoring_error(rank, world, kwargs):
    """The ScoringError message of a run (None when it succeeds)."""
    from megatron_slm.scoring import ScoreConfig, ScoringError, score_corpus

    try:
        _init(kwargs)
        score_corpus(ScoreConfig(**kwargs))
    except (ScoringError, FileExistsError) as e:
        return f"{type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    ckpt = str(root / "ref")
    prefix = write_token_dataset(str(root / "corpus"), DOCS, vocab_size=VOCAB)
    ctx = dict(root=root, ckpt=ckpt, prefix=prefix)
    tp1, rows = _copy_data(ctx, "tp1"), _copy_data(ctx, "rows")
    ((expected, contexts), reports, _) = run_distributed(
        prepare, 1, ckpt, DOCS, _kwargs(ctx, tp1), _kwargs(ctx, rows, packing="rows")
    )[0]
    return dict(ctx, expected=expected, contexts=contexts, tp1=tp1, rows=rows, tp1_reports=reports)


def _copy_data(setup, name):
    """A fresh copy of the token dataset (so each test writes its own sidecar)."""
    d = setup["root"] / name
    d.mkdir()
    dst = str(d / "corpus")
    for ext in (".bin", ".idx"):
        shutil.copyfile(setup["prefix"] + ext, dst + ext)
    return dst


def _kwargs(setup, prefix, **extra):
    kw = dict(
        data_prefix=[prefix],
        load=setup["ckpt"],
        seq_length=SEQ,
        stride=STRIDE,
        micro_batch_size=MBS,
        commit_interval=INTERVAL,
        dtype="float32",
        device="cpu",
    )
    kw.update(extra)
    return kw


def _check_exact(setup, prefix):
    from megatron_slm.data import SidecarReader

    reader = SidecarReader(prefix)
    assert reader.num_documents == len(DOCS)
    for d, expected in enumerate(setup["expected"]):
        got = reader.get(d)
        assert np.isnan(got[0])
        np.testing.assert_allclose(got[1:], expected[1:], rtol=0, atol=TOL, err_msg=f"doc {d}")


def _sidecar_bytes(prefix):
    from megatron_slm.data.sidecar import sidecar_paths

    b, j = sidecar_paths(prefix)
    return open(b, "rb").read(), open(j).read()


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_reference_windows_keep_enough_context(setup):
    """The plain reference itself: every token of a long document has >= SEQ - STRIDE context."""
    for doc, ctx in zip(DOCS, setup["contexts"]):
        n = len(doc)
        for i in range(1, n):
            assert ctx[i] >= min(i, SEQ - STRIDE), (n, i, ctx[i])
    assert max(map(len, DOCS)) > 3 * SEQ  # several windows


def test_exact_tp1_packing_and_windows(setup):
    prefix, reports = setup["tp1"], setup["tp1_reports"]
    _check_exact(setup, prefix)
    (report,) = reports
    assert report["published"] and report["documents"] == len(DOCS)
    assert report["tokens"] == sum(map(len, DOCS))
    finite = np.concatenate([e[1:] for e in setup["expected"]])
    assert report["mean_ref_loss"] == pytest.approx(finite.mean(), abs=1e-5)
    settings = json.load(open(prefix + "_refloss.json"))["settings"]
    assert settings["seq_length"] == SEQ and settings["stride"] == STRIDE
    assert settings["packing"] == "length-sorted"


def test_exact_tp1_packed_rows_block_diagonal(setup):
    _check_exact(setup, setup["rows"])
    assert json.load(open(setup["rows"] + "_refloss.json"))["settings"]["packing"] == "rows"


@pytest.mark.parametrize("layout", ["tp2", "dp2", "pp2"])
def test_exact_parallel(setup, layout):
    prefix = _copy_data(setup, layout)
    extra = {
        "tp2": dict(tensor_model_parallel_size=2),
        "dp2": {},
        "pp2": dict(pipeline_model_parallel_size=2),
    }[layout]
    run_distributed(run_scorer, 2, _kwargs(setup, prefix, **extra))
    _check_exact(setup, prefix)
    if layout == "dp2":  # chunks are packed alike whatever the DP size: the very same bytes
        assert _sidecar_bytes(prefix) == _sidecar_bytes(setup["tp1"])


def _cli(setup, prefix, kill=None, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MEGATRON_SLM_SCORE_KILL_AT", None)
    if kill:
        env["MEGATRON_SLM_SCORE_KILL_AT"] = kill
    kw = _kwargs(setup, prefix)
    args = [sys.executable, os.path.join(REPO, "tools", "score_corpus.py")]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        args += [flag, *v] if isinstance(v, list) else [flag, str(v)]
    return zygote.run(
        args + list(extra), env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_resume_after_sigkill_is_byte_identical(setup):
    """Killed after the 1st commit, after rank 0 wrote a round's values, and right before
    publication; each rerun continues; the result equals the uninterrupted run."""
    prefix = _copy_data(setup, "resume")
    for kill in ("commit:1", "range:2", "finalize:1"):
        proc = _cli(setup, prefix, kill)
        assert proc.returncode == -9, (kill, proc.returncode, proc.stderr[-3000:])
        assert not os.path.exists(prefix + "_refloss.json"), kill
        assert os.path.isdir(prefix + "_refloss.ranges")  # partial state kept for the rerun
    proc = _cli(setup, prefix)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokens/s" in proc.stdout and "mean reference loss" in proc.stdout
    assert _sidecar_bytes(prefix) == _sidecar_bytes(setup["tp1"])
    assert sorted(os.listdir(os.path.dirname(prefix))) == [
        "corpus.bin",
        "corpus.idx",
        "corpus_refloss.bin",
        "corpus_refloss.json",
        "corpus_refloss.lock",
    ]
    # A published sidecar is refused without --overwrite (CLI exit status 2, clear message).
    proc = _cli(setup, prefix)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--overwrite" in proc.stderr


def test_bad_inputs_overwrite_and_dry_run(setup):
    root = setup["root"]
    corrupt = _copy_data(setup, "corrupt")
    dry = _copy_data(setup, "dry")
    # An id outside the reference vocabulary in the third chunk: found by the prefetch thread,
    # raised on the main thread before that round, after the first chunks were written.
    (root / "bad_id").mkdir()
    bad_docs = [list(d) for d in DOCS]
    bad_docs[2 * INTERVAL + 1][-1] = VOCAB + 100
    bad_id = write_token_dataset(str(root / "bad_id" / "corpus"), bad_docs, vocab_size=1 << 17)
    cases = {
        "checkpoint": (_kwargs(setup, setup["prefix"], load=str(root / "nope")), "no such"),
        "prefix": (_kwargs(setup, str(root / "missing" / "corpus")), "not found"),
        # a tokenizer other than the checkpoint's: refused before any work, naming the flag
        "vocab": (_kwargs(setup, setup["prefix"], vocab_size=300), "--vocab-size: the tokenizer"),
        "model_vocab": (
            _kwargs(setup, setup["prefix"], tokenizer_type="NullTokenizer", vocab_size=1000),
            f"has 1001 ids, the checkpoint --load {setup['ckpt']}/iter_0000001 recorded {VOCAB} "
            f"(a NullTokenizer's --vocab-size {VOCAB - 1}, then its EOD)",
        ),
        "preset": (_kwargs(setup, setup["prefix"], hidden_size=128), "--hidden-size 128"),
        "partial": (_kwargs(setup, corrupt), "is corrupted"),
        "exists": (_kwargs(setup, setup["tp1"]), "already exists"),
        "bad_id": (
            _kwargs(setup, bad_id),
            f"documents {2 * INTERVAL}..{3 * INTERVAL - 1} contain token id {VOCAB + 100}",
        ),
    }
    (out,) = run_distributed(
        _bad_inputs_worker,
        1,
        {k: v[0] for k, v in cases.items()},
        _kwargs(setup, corrupt),
        _kwargs(setup, dry, dry_run=True),
    )
    for name, (_, needle) in cases.items():
        assert out[name] is not None and needle in out[name], (name, out[name])
    # --overwrite starts over from a corrupted partial sidecar.
    assert _sidecar_bytes(corrupt) == _sidecar_bytes(setup["tp1"])
    # --dry-run scores two chunks (two rounds at DP=1), writes nothing and estimates the time of
    # the whole corpus: the first round's time, then the rest at the second round's rate.
    (report,) = out["dry_run"]
    assert report["documents"] == 2 * INTERVAL and report["steady_tokens_per_second"] > 0
    rest = report["tokens_total"] - sum(map(len, DOCS[:INTERVAL]))
    expected = report["first_round_seconds"] + rest / report["steady_tokens_per_second"]
    assert report["estimated_seconds"] == pytest.approx(expected)
    assert report["tokens_total"] == sum(map(len, DOCS))
    assert sorted(os.listdir(os.path.dirname(dry))) == ["corpus.bin", "corpus.idx"]
    # the chunks before the bad one were written and recorded, for a rerun after fixing the data
    assert sorted(os.listdir(bad_id + "_refloss.ranges")) == [
        f"0-{INTERVAL}",
        f"{INTERVAL}-{2 * INTERVAL}",
    ]


def _bad_inputs_worker(rank, world, cases, corrupt_kwargs, dry_kwargs):
    # A trial (--max-docs) leaves a partial sidecar; then corrupt its metadata.
    run_scorer(rank, world, dict(corrupt_kwargs, max_docs=INTERVAL))
    with open(corrupt_kwargs["data_prefix"][0] + "_refloss.json.partial", "w") as f:
        f.write('{"format": "megatron-slm-side')
    out = {name: scoring_error(rank, world, kw) for name, kw in cases.items()}
    run_scorer(rank, world, dict(corrupt_kwargs, overwrite=True))
    out["dry_run"] = run_scorer(rank, world, dry_kwargs)
    return out
