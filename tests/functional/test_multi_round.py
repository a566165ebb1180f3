"""Multiple-round training (RethinkTinyLM): round 1 -> tools/score_batches.py ->
tools/resample_batches.py -> round 2 with --train-samples-from.

One module fixture trains round 1 on a corpus of easy and hard documents and scores its batches;
the tests check the scores against an independent forward of the trainer's own samples (TP=1,
TP=2, DP=2), the resume after SIGKILL, the samples round 2 consumes, its exact resume, and that
resampled batches lower the hard part's loss more than uniformly drawn ones.
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
from tests.functional.pretrain_helpers import REPO, VOCAB, VOCAB_FLAG, read_steps, run_pretrain

pytestmark = pytest.mark.slow
SEQ, GBS, MBS = 32, 4, 2
ROUND1 = 24  # round-1 steps = batches of the scored order
HARD = 256  # hard documents use ids >= HARD
KILL_ENV = "MEGATRON_SLM_SCORE_BATCHES_KILL_AT"


def _corpus(directory: str) -> str:
    """Easy documents count upward through 64 ids; hard ones follow a fixed random permutation
    of 240 ids (240 bigrams to learn instead of 64, seen 3x less often). One document per sample
    (SEQ - 1 tokens + EOD), so a sample is all easy or all hard."""
    from tests.unit.data import write_token_dataset

    rng = np.random.default_rng(0)
    perm = rng.permutation(240)
    docs = []
    for d in range(96):
        x = int(rng.integers(0, 240))
        if d % 4 == 0:
            doc = []
            for _ in range(SEQ - 1):
                doc.append(HARD + x)
                x = int(perm[x])
        else:
            doc = [(x + i) % 64 for i in range(SEQ - 1)]
        docs.append(doc)
    return write_token_dataset(os.path.join(directory, "corpus"), docs, vocab_size=VOCAB)


def train_args(prefix, log, iters, *extra):
    return [
        "--data-path", prefix, "--split", "100,0,0", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", VOCAB_FLAG, "--model-preset", "tiny", "--num-layers", 2,
        "--seq-length", SEQ, "--micro-batch-size", MBS, "--global-batch-size", GBS,
        "--train-iters", iters, "--lr", "3e-3", "--lr-decay-style", "constant",
        "--eval-interval", 0, "--log-interval", 1, "--log-loss-file", log, "--seed", 5, *extra,
    ]  # fmt: skip


def score_kwargs(ckpt, prefix, output, **extra):
    return {
        **dict(load=ckpt, data_path=[prefix], split="100,0,0", seq_length=SEQ, seed=5,
               global_batch_size=GBS, train_iters=ROUND1, output=output, micro_batch_size=MBS,
               commit_interval=3, device="cpu"),
        **extra,
    }  # fmt: skip


# -- workers (spawned processes) -----------------------------------------------------------------


def _score(kwargs):
    from megatron_slm import launch
    from megatron_slm.tinylm.batch_scores import score_batches
    from megatron_slm.tinylm.rounds_config import ScoreBatchesConfig

    config = ScoreBatchesConfig(**kwargs)
    launch.initialize(
        device="cpu",
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
    )
    report = score_batches(config)
    return None if report is None else report.__dict__


def score_and_check(rank, world, kwargs, argv):
    """TP=1 scores, and the independent losses of the same checkpoint."""
    return _score(kwargs), independent_losses(rank, world, {"r1": kwargs["load"]}, argv)


def score_layouts(rank, world, layouts):
    """Several layouts in one 2-process world (the parallel state is re-initialised each time)."""
    return [_score(kwargs) for kwargs in layouts]


def independent_losses(rank, world, ckpts, argv):
    """Per-sample mean loss of every training sample, in the trainer's order: the samples from
    the trainer's own dataset builder, the model built and loaded at TP=1, full-vocabulary
    ``F.cross_entropy`` on its logits."""
    import torch
    import torch.nn.functional as F

    from megatron_slm import launch
    from megatron_slm.checkpoint import load_checkpoint, read_checkpoint
    from megatron_slm.models import ModelBuildOptions, build_model
    from megatron_slm.training.config import parse_config
    from megatron_slm.training.data import build_datasets
    from megatron_slm.training.loop import plan_training

    launch.initialize(device="cpu")
    cfg = parse_config(argv)
    plan = plan_training(cfg, 1)
    train, _, _ = build_datasets(cfg, plan.sizes, plan.tokenizer, False)
    samples = [train[i] for i in range(ROUND1 * GBS)]  # the samples round 1 trained on
    tokens = torch.stack([s["tokens"] for s in samples])  # [n, s]
    labels = torch.stack([s["labels"] for s in samples])
    mask = torch.stack([s["loss_mask"] for s in samples]).double()
    positions = torch.stack([s["position_ids"] for s in samples])
    hard = (tokens >= HARD).double().mean(1) > 0.5
    out = {}
    for name, ckpt in ckpts.items():
        info = read_checkpoint(ckpt)
        (model,) = build_model(info.model, ModelBuildOptions(transformer_impl="torch"))
        load_checkpoint(info.path, [model], weights_only=True)
        model.eval()
        with torch.no_grad():
            logits = model(tokens, positions, None)  # [n, s, v]
        tok = F.cross_entropy(logits.double().transpose(1, 2), labels, reduction="none")  # [n, s]
        losses = (tok * mask).sum(1) / mask.sum(1)
        out[name] = (losses.numpy(), hard.numpy())
    return out


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    prefix = _corpus(str(root))
    r1 = str(root / "round1")
    run_pretrain(train_args(prefix, str(root / "r1.jsonl"), ROUND1, "--save", r1))
    losses = str(root / "losses_tp1")
    argv = [str(a) for a in train_args(prefix, "unused", ROUND1)]
    ((report, ref),) = run_distributed(score_and_check, 1, score_kwargs(r1, prefix, losses), argv)
    return {"root": root, "prefix": prefix, "round1": r1, "losses": losses, "report": report,
            "independent": ref["r1"]}  # fmt: skip


def _bytes(prefix):
    with open(prefix + ".bin", "rb") as a, open(prefix + ".json", "rb") as b:
        return a.read(), b.read()


def _losses(prefix):
    from megatron_slm.data.sample_list import read_batch_losses

    return read_batch_losses(prefix)


# -- batch scores --------------------------------------------------------------------------------


def test_scores_equal_independent_forward_tp1(rounds):
    want, hard = rounds["independent"]
    got = _losses(rounds["losses"])
    assert rounds["report"]["samples"] == len(want) == ROUND1 * GBS
    assert got.source["batches"] == ROUND1 and got.source["num_samples"] == ROUND1 * GBS
    np.testing.assert_allclose(got.sample_losses, want, rtol=0, atol=1e-5)
    assert (got.records["tokens"] == SEQ).all()
    # After round 1 the hard samples are the high-loss ones (the premise of the last test).
    assert want[hard].mean() > want[~hard].mean() + 1.0, (want[hard].mean(), want[~hard].mean())


def _cli(rounds, output, kill=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    env.pop(KILL_ENV, None)
    if kill:
        env[KILL_ENV] = kill
    args = [sys.executable, os.path.join(REPO, "tools", "score_batches.py")]
    for k, v in score_kwargs(rounds["round1"], rounds["prefix"], output).items():
        args += ["--" + k.replace("_", "-"), *(v if isinstance(v, list) else [str(v)])]
    return zygote.run(args, env=env, capture_output=True, text=True, timeout=300)


def test_scores_at_tp2_dp2_and_resume_after_sigkill(rounds):
    """TP=2 equals TP=1 (1e-5); a CLI run SIGKILLed after two of its 8 chunks is finished by a
    DP=2 run, which publishes the very bytes of the uninterrupted TP=1 run (chunks are forwarded
    alike whatever the DP size or restart point)."""
    outs = {k: str(rounds["root"] / f"losses_{k}") for k in ("tp2", "dp2")}
    proc = _cli(rounds, outs["dp2"], "commit:2")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not os.path.exists(outs["dp2"] + ".json")
    assert len(os.listdir(outs["dp2"] + ".ranges")) == 2
    layouts = [
        score_kwargs(rounds["round1"], rounds["prefix"], outs["tp2"], tensor_model_parallel_size=2),
        score_kwargs(rounds["round1"], rounds["prefix"], outs["dp2"]),
    ]
    reports = run_distributed(score_layouts, 2, layouts)
    assert reports[1] == [None, None]
    tp2, dp2 = reports[0]
    assert tp2["scored_samples"] == ROUND1 * GBS and dp2["scored_samples"] == 72
    want = _losses(rounds["losses"]).sample_losses
    np.testing.assert_allclose(_losses(outs["tp2"]).sample_losses, want, rtol=0, atol=1e-5)
    assert _bytes(outs["dp2"]) == _bytes(rounds["losses"])
    assert not os.path.exists(outs["dp2"] + ".ranges")
    assert not os.path.exists(outs["dp2"] + ".bin.partial")


def score_documents_and_check(rank, world, kwargs, argv, eod):
    """Scores with --reset-attention-mask --eod-mask-loss, and the independent losses: each
    document of each training sample (the trainer's own builder) forwarded alone at TP=1, the
    sample's loss the mean over the positions whose input is not an end-of-document token."""
    import torch
    import torch.nn.functional as F

    from megatron_slm import launch
    from megatron_slm.checkpoint import load_checkpoint, read_checkpoint
    from megatron_slm.models import ModelBuildOptions, build_model
    from megatron_slm.training.config import parse_config
    from megatron_slm.training.data import build_datasets
    from megatron_slm.training.loop import plan_training

    report = _score(kwargs)
    launch.initialize(device="cpu")
    cfg = parse_config(argv)
    plan = plan_training(cfg, 1)
    train, _, _ = build_datasets(cfg, plan.sizes, plan.tokenizer, False)
    info = read_checkpoint(kwargs["load"])
    (model,) = build_model(info.model, ModelBuildOptions(transformer_impl="torch"))
    load_checkpoint(info.path, [model], weights_only=True)
    model.eval()
    want, documents = [], 0
    for i in range(kwargs["train_iters"] * GBS):
        tokens, labels = train[i]["tokens"], train[i]["labels"]
        text = torch.cat([tokens, labels[-1:]])  # the sample's s + 1 tokens
        ends = [*(tokens == eod).nonzero().flatten().tolist(), len(tokens) - 1]
        losses, start = torch.empty(len(tokens), dtype=torch.float64), 0
        for end in ends:
            if start <= end:  # positions start..end see text[start..j], predict text[j + 1]
                doc = text[start : end + 2][None]
                with torch.no_grad():
                    logits = model(doc, torch.arange(doc.shape[1])[None], None)[0, :-1]
                losses[start : end + 1] = F.cross_entropy(
                    logits.double(), doc[0, 1:], reduction="none"
                )
                documents += 1
            start = end + 1
        keep = tokens != eod
        want.append(float(losses[keep].mean()))
    return report, np.array(want), documents


def test_scores_with_document_flags_equal_documents_forwarded_alone(rounds, tmp_path):
    """--reset-attention-mask and --eod-mask-loss, as the trainer runs with them: on a corpus
    of short documents (several per sample) each sample's score is its documents' losses, each
    forwarded alone, without the predictions that follow an end-of-document token."""
    from tests.unit.data import write_token_dataset

    rng = np.random.default_rng(3)
    eod = VOCAB - 1  # NullTokenizer's end-of-document id, ending each document
    docs = [[*map(int, rng.integers(0, 64, int(n))), eod] for n in rng.integers(2, 9, 120)]
    prefix = write_token_dataset(str(tmp_path / "short"), docs, vocab_size=VOCAB)
    flags = ["--reset-attention-mask", "--eod-mask-loss"]
    argv = [str(a) for a in train_args(prefix, "unused", 4, *flags)]
    kwargs = score_kwargs(rounds["round1"], prefix, str(tmp_path / "docs"), train_iters=4,
                          reset_attention_mask=True, eod_mask_loss=True)  # fmt: skip
    ((report, want, documents),) = run_distributed(score_documents_and_check, 1, kwargs, argv, eod)
    got = _losses(str(tmp_path / "docs"))
    assert report["samples"] == len(want) == 4 * GBS and documents > 3 * len(want)
    np.testing.assert_allclose(got.sample_losses, want, rtol=0, atol=1e-5)
    plain = score_kwargs(rounds["round1"], prefix, str(tmp_path / "plain"), train_iters=4)
    run_distributed(score_layouts, 1, [plain])
    assert np.abs(_losses(str(tmp_path / "plain")).sample_losses - want).max() > 1e-3
    # --eod-mask-loss leaves the tokens after each end-of-document token out of the counts
    assert (got.records["tokens"] < SEQ).all()


# -- round 2 -------------------------------------------------------------------------------------


def _resample(rounds, name, *extra):
    from megatron_slm.data.sample_list import read_batch_list
    from tests.unit.tinylm.test_resample import _tool

    out = str(rounds["root"] / name)
    argv = ["--losses", rounds["losses"], "--keep", "0.5", "--seed", "11", "--output", out]
    assert _tool("resample_batches").main([*argv, *extra]) == 0
    return out, read_batch_list(out)


def test_round2_consumes_the_list_and_resumes_exactly(rounds):
    root, prefix = rounds["root"], rounds["prefix"]
    idx, blist = _resample(rounds, "round2.idx", "--temperature", "0.5")
    assert len(blist.batches) == 12
    r2 = ["--load", rounds["round1"], "--finetune", "--train-samples-from", idx]
    full, record = str(root / "r2_full.jsonl"), str(root / "r2_samples.jsonl")
    save = str(root / "round2")
    run_pretrain(train_args(prefix, full, 12, *r2, "--save", save, "--save-interval", 5,
                            "--train-samples-record", record))  # fmt: skip
    want = [[b * GBS + j for j in range(GBS)] for b in blist.batches]

    def recorded(path):
        with open(path) as f:
            return [(s["iteration"], s["samples"]) for s in map(json.loads, f)]

    assert recorded(record) == list(zip(range(1, 13), want))
    # resume inside the round from the step-5 checkpoint (no --finetune): identical losses
    part, part_record = str(root / "r2_part.jsonl"), str(root / "r2_part_samples.jsonl")
    resume = ["--load", os.path.join(save, "iter_0000005"), "--train-samples-from", idx]
    run_pretrain(train_args(prefix, part, 12, *resume, "--train-samples-record", part_record))
    a, b = read_steps(full), read_steps(part)
    assert [r["iteration"] for r in b] == list(range(6, 13))
    assert [r["loss"] for r in b] == [r["loss"] for r in a[5:]]
    assert [r["consumed_samples"] for r in b] == [GBS * i for i in range(6, 13)]
    assert recorded(part_record) == list(zip(range(6, 13), want[5:]))
    rounds["round2"] = str(root / "round2")


def test_round2_refuses_a_list_of_other_data(rounds, capsys):
    from megatron_slm import pretrain

    idx, _ = _resample(rounds, "round2_check.idx")
    base = train_args(rounds["prefix"], str(rounds["root"] / "bad.jsonl"), 4)
    for extra, needle in (
        (["--seed", "6"], "--seed 5, the run has --seed 6"),
        (["--global-batch-size", "8"], "--global-batch-size 4, the run has --global-batch-size 8"),
        (["--train-iters", "40"], "holds 12 batches, fewer than the 40 training steps"),
        (["--load", rounds["round1"]], "was not trained on --train-samples-from"),
    ):
        argv = [str(a) for a in [*base, "--device", "cpu", "--train-samples-from", idx, *extra]]
        assert pretrain.main(argv) == 2  # fails in planning, before any process group
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("python -m megatron_slm.pretrain: error: --")
        assert needle in err[-1], err[-1]


def test_resampled_round_lowers_hard_loss_more_than_uniform(rounds):
    """Round 2 on 12 resampled batches vs on 12 uniformly drawn ones, both from round 1."""
    import torch

    from megatron_slm.data.sample_list import write_batch_list

    if "round2" not in rounds:
        pytest.skip("needs test_round2_consumes_the_list_and_resumes_exactly")
    root, prefix = rounds["root"], rounds["prefix"]
    src = _losses(rounds["losses"]).source
    g = torch.Generator().manual_seed(11)
    uniform = torch.randperm(src["batches"], generator=g)[:12].tolist()
    idx = str(root / "uniform.idx")
    write_batch_list(idx, src, uniform)
    ckpt = str(root / "round2_uniform")
    run_pretrain(train_args(prefix, str(root / "u.jsonl"), 12, "--load", rounds["round1"],
                            "--finetune", "--train-samples-from", idx, "--save", ckpt))  # fmt: skip
    argv = [str(a) for a in train_args(prefix, "x", ROUND1)]
    ckpts = {"resampled": rounds["round2"], "uniform": ckpt}
    (ref,) = run_distributed(independent_losses, 1, ckpts, argv)
    ref["round1"] = rounds["independent"]
    hard = ref["round1"][1]
    mean = {k: float(v[0][hard].mean()) for k, v in ref.items()}
    drop_resampled = mean["round1"] - mean["resampled"]
    drop_uniform = mean["round1"] - mean["uniform"]
    assert drop_resampled > drop_uniform + 0.1, mean
    shutil.rmtree(ckpt)
