"""The SLM trainer end to end: real ``python -m megatron_slm.pretrain`` runs (torchrun for several
ranks) on a tiny model, CPU."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from tests import zygote
from tests.dist_helpers import run_distributed
from tests.functional.pretrain_helpers import (
    make_null_corpus,
    megatron_rates,
    read_steps,
    run_pretrain,
    tiny_args,
)

pytestmark = pytest.mark.slow
SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    # Documents of exactly SEQ tokens with their EOD: every sample starts at a document start,
    # so the online reference sees each document from its beginning, like the scorer.
    prefix = make_null_corpus(str(root), "aligned", [SEQ - 1] * 96)
    return root, prefix


@pytest.fixture(scope="module")
def reference_ckpt(corpus):
    root, prefix = corpus
    ckpt = str(root / "ref")
    run_pretrain(tiny_args(prefix, str(root / "ref.jsonl"), 6, "--save", ckpt, "--seed", 7))
    return ckpt


def test_plain_loss_falls_and_ratio_one_is_plain(corpus, tmp_path):
    _, prefix = corpus
    log = tmp_path / "plain.jsonl"
    proc = run_pretrain(tiny_args(prefix, str(log), 10, "--cross-entropy-impl", "megatron"))
    assert "plain loss: megatron-core's vocab_parallel_cross_entropy" in proc.stderr
    plain = read_steps(str(log))
    assert plain[-1]["loss"] < plain[0]["loss"] - 0.5, [r["loss"] for r in plain]
    log = tmp_path / "fused.jsonl"
    proc = run_pretrain(tiny_args(prefix, str(log), 10))  # the default: the fused op
    assert "plain loss: the fused op (megatron_slm._C, cpp kernels)" in proc.stderr
    fused = read_steps(str(log))
    ratio1 = read_steps_of(prefix, tmp_path / "ratio1.jsonl", 10, "--slm-ratio", "1.0")
    # Same per-step losses as megatron-core's cross entropy: the fused op at ratio 1 is plain
    # cross entropy over every token, as the plain loss and inside selective training.
    for a, b, c in zip(plain, fused, ratio1):
        assert a["selected_fraction"] == b["selected_fraction"] == c["selected_fraction"] == 1.0
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0)
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0)


def read_steps_of(prefix, log_file, iters, *extra, nproc=1):
    """The steps of a run on ``tiny_args`` with ``extra``; with Megatron-LM's shape flags in
    ``extra`` (``GPT3``) there is no preset."""
    preset = None if "--num-layers" in extra else "tiny"
    run_pretrain(tiny_args(prefix, str(log_file), iters, *extra, preset=preset), nproc=nproc)
    return read_steps(str(log_file))


def _score_documents(rank, world, ckpt, prefix):
    """Independent sidecar: each document forwarded alone through the reference model."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_slm import launch
    from megatron_slm.checkpoint import load_checkpoint, read_checkpoint
    from megatron_slm.data import SidecarWriter
    from megatron_slm.models import ModelBuildOptions, build_model

    launch.initialize(device="cpu")
    (model,) = build_model(read_checkpoint(ckpt).model, ModelBuildOptions())
    load_checkpoint(ckpt, [model], weights_only=True)
    model.eval()
    ds = IndexedDataset(prefix)
    values = []
    with torch.no_grad():
        for i in range(len(ds)):
            doc = torch.from_numpy(ds[i].astype(np.int64))[None]  # [1, n]
            pos = torch.arange(doc.shape[1] - 1)[None]
            loss = model(doc[:, :-1], pos, None, labels=doc[:, 1:])[0]
            values.append(np.concatenate([[np.nan], loss.numpy()]).astype(np.float32))
    writer = SidecarWriter(
        prefix, dtype="float32", reference=ckpt, settings={"test": True}, overwrite=True
    )
    writer.write_range(0, values)
    writer.finalize()


SLM = ("--slm-ratio", "0.5", "--slm-unscored", "drop")

# Megatron-LM's GPT-3 model flags (no architecture flag) in place of --model-preset tiny: the tiny
# shape with LayerNorm, GeLU, learned positions, biases and tied embeddings.
GPT3 = ("--num-layers", 4, "--hidden-size", 64, "--num-attention-heads", 4,
        "--max-position-embeddings", SEQ)  # fmt: skip


@pytest.fixture(scope="module")
def online_steps(corpus, reference_ckpt, tmp_path_factory):
    _, prefix = corpus
    log = tmp_path_factory.mktemp("online") / "online.jsonl"
    return read_steps_of(
        prefix, log, 6, *SLM, "--slm-ref-source", "online", "--slm-ref-load", reference_ckpt
    )


def _score_with_tool(ckpt, prefix):
    import sys

    from tests.functional.pretrain_helpers import REPO

    zygote.run(
        [sys.executable, os.path.join(REPO, "tools", "score_corpus.py"), "--data-prefix", prefix,
         "--load", ckpt, "--seq-length", str(SEQ), "--dtype", "float32", "--overwrite",
         "--device", "cpu"],
        check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=REPO),
    )  # fmt: skip


@pytest.mark.parametrize("scorer", ["independent", "score_corpus"])
def test_sidecar_and_online_reference_agree(corpus, reference_ckpt, online_steps, scorer, tmp_path):
    """The same selections and losses from a sidecar (written by an independent one-document-at-
    a-time forward, or by tools/score_corpus.py) as from the online reference model."""
    _, prefix = corpus
    if scorer == "independent":
        run_distributed(_score_documents, 1, reference_ckpt, prefix)
    else:
        _score_with_tool(reference_ckpt, prefix)
    sidecar = read_steps_of(prefix, tmp_path / "sidecar.jsonl", 6, *SLM)
    assert len(sidecar) == len(online_steps) == 6
    for a, b in zip(online_steps, sidecar):
        assert a["n_selected"] == b["n_selected"]
        assert 0.4 < a["selected_fraction"] < 0.6
        assert b["selected_loss"] == pytest.approx(a["selected_loss"], rel=1e-5)
        assert b["excess_loss"] == pytest.approx(a["excess_loss"], rel=1e-4, abs=1e-5)
    # Selective training optimises fewer tokens than plain: selected loss differs from the mean.
    assert any(abs(r["selected_loss"] - r["loss"]) > 1e-3 for r in sidecar)


@pytest.fixture(scope="module")
def gpt3_reference(tmp_path_factory):
    """A corpus of its own and a GPT-3-architecture reference model trained on it."""
    root = tmp_path_factory.mktemp("gpt3")
    prefix = make_null_corpus(str(root), "aligned", [SEQ - 1] * 96, seed=3)
    ckpt = str(root / "ref")
    args = tiny_args(prefix, str(root / "ref.jsonl"), 6, *GPT3, "--save", ckpt, preset=None)
    run_pretrain([*args, "--seed", 7])
    return prefix, ckpt


def test_gpt3_reference_scores_and_selects_like_online(gpt3_reference, tmp_path):
    """A GPT-3-architecture reference (learned positions, biases, tied embeddings):
    tools/score_corpus.py writes what each document forwarded alone gives, and training on that
    sidecar selects and logs what the same reference gives online."""
    from megatron_slm.data.sidecar import SidecarReader

    prefix, ckpt = gpt3_reference
    run_distributed(_score_documents, 1, ckpt, prefix)
    alone = SidecarReader(prefix).values.copy()
    _score_with_tool(ckpt, prefix)
    np.testing.assert_allclose(SidecarReader(prefix).values, alone, rtol=1e-5, atol=1e-6)
    online = read_steps_of(
        prefix, tmp_path / "online.jsonl", 6, *SLM, "--slm-ref-source", "online",
        "--slm-ref-load", ckpt,
    )  # fmt: skip
    sidecar = read_steps_of(prefix, tmp_path / "sidecar.jsonl", 6, *SLM)
    for a, b in zip(online, sidecar, strict=True):
        assert a["n_selected"] == b["n_selected"]
        assert b["selected_loss"] == pytest.approx(a["selected_loss"], rel=1e-5)
        assert b["excess_loss"] == pytest.approx(a["excess_loss"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    "layout",
    [("1", "1", 1, ()), ("1", "2", 2, ()),
     ("1", "2", 2, (*GPT3, "--decoder-last-pipeline-num-layers", 1))],
    ids=["tp1", "pp2", "gpt3-pp2-uneven"],
)  # fmt: skip
def test_exact_resume(corpus, tmp_path, layout):
    """Straight and stopped-and-resumed runs log the same losses; with GPT-3's architecture at
    PP=2 the checkpoint holds the output layer tied to the embedding of another stage, here an
    uneven split (3 layers, then 1: --decoder-last-pipeline-num-layers)."""
    _, prefix = corpus
    tp, pp, nproc, model = layout
    par = ("--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp, *model)
    slm = ("--slm-ratio", "0.7", "--slm-select-mode", "loss")
    straight = read_steps_of(prefix, tmp_path / "straight.jsonl", 8, *par, *slm, nproc=nproc)
    ckpt = str(tmp_path / "ckpt")
    first = read_steps_of(
        prefix, tmp_path / "resumed.jsonl", 8, *par, *slm, "--save", ckpt,
        "--save-interval", 2, "--exit-interval", 4, nproc=nproc,
    )  # fmt: skip
    assert [r["iteration"] for r in first] == [1, 2, 3, 4]
    resumed = read_steps_of(
        prefix, tmp_path / "resumed.jsonl", 8, *par, *slm, "--load", ckpt, nproc=nproc
    )
    assert [r["iteration"] for r in resumed] == list(range(1, 9))
    pairs = list(zip(straight, resumed))
    if nproc == 1:  # --ckpt-step 2: the earlier of the two checkpoints, not the latest (4)
        from_two = read_steps_of(
            prefix, tmp_path / "from_two.jsonl", 8, *par, *slm, "--load", ckpt, "--ckpt-step", 2
        )
        assert [r["iteration"] for r in from_two] == list(range(3, 9))
        pairs += zip(straight[2:], from_two)
    for a, b in pairs:
        assert (a["iteration"], a["consumed_samples"]) == (b["iteration"], b["consumed_samples"])
        assert a["loss"] == b["loss"] and a["selected_loss"] == b["selected_loss"]


def test_uneven_virtual_pipeline_stages_train_alike_and_resume(corpus, tmp_path):
    """--num-virtual-stages-per-pipeline-rank (Megatron-LM's flag) with an uneven split: 6
    layers, 2 on the first stage and 4 on the last, each stage in 2 chunks (1 + 1, 2 + 2),
    fine-tuning a PP 1 checkpoint: the steps of PP 1 (the sends and receives overlapped, as
    Megatron-LM's default; also with another micro-batch group size); stopped after step 2 and
    resumed, the same steps (the distributed optimizer's state per chunk, its layout
    recorded)."""
    from megatron_slm.checkpoint import iteration_dir, read_metadata

    _, prefix = corpus
    deep = ("--num-layers", 6)
    base = str(tmp_path / "base")  # (initialisations differ between layouts: start from one)
    run_pretrain(tiny_args(prefix, str(tmp_path / "base.jsonl"), 3, *deep, "--save", base))
    start = ("--pretrained-checkpoint", base)
    whole = read_steps_of(prefix, tmp_path / "pp1.jsonl", 4, *deep, *start)
    layout = (
        "--pipeline-model-parallel-size",
        2,
        "--decoder-first-pipeline-num-layers",
        2,
        "--num-virtual-stages-per-pipeline-rank",
        2,
        "--use-distributed-optimizer",
        *deep,
    )
    save = str(tmp_path / "ckpt")
    same = (*layout, *start, "--load", save, "--save", save)
    log = tmp_path / "vpp.jsonl"
    run_pretrain(tiny_args(prefix, str(log), 4, *same, "--exit-interval", 2), nproc=2)
    meta = read_metadata(iteration_dir(save, 2))
    assert meta["optimizer_layout"]["virtual_pipeline_size"] == 2
    v = same.index("--num-virtual-stages-per-pipeline-rank")
    one_chunk = same[:v] + same[v + 2 :]  # the same split, without virtual stages
    proc = run_pretrain(tiny_args(prefix, str(tmp_path / "x.jsonl"), 4, *one_chunk), nproc=2,
                        check=False)  # fmt: skip
    assert proc.returncode != 0 and "virtual pipeline stages per rank" in proc.stderr
    assert "saved 2, this run unset" in proc.stderr
    run_pretrain(tiny_args(prefix, str(log), 4, *same), nproc=2)
    steps = read_steps(str(log))
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4]
    # each virtual stage runs all 4 micro-batches in a row (Megatron-LM's flag; default 2)
    grouped = tmp_path / "grouped.jsonl"
    group = ("--microbatch-group-size-per-virtual-pipeline-stage", 4)
    run_pretrain(tiny_args(prefix, str(grouped), 4, *layout, *start, *group), nproc=2)
    for a, b, c in zip(whole, steps, read_steps(str(grouped)), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0)
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0)


def test_pipeline_layouts_train_as_pp_1(corpus, tmp_path):
    """--pipeline-model-parallel-layout (Megatron-LM's flag): a first stage holding only the
    embedding, and virtual stages whose last chunk holds only the loss, fine-tuning a PP 1
    checkpoint: the steps of PP 1; the optimizer layout records the layout written out."""
    from megatron_slm.checkpoint import iteration_dir, read_metadata

    _, prefix = corpus
    base = str(tmp_path / "base")  # (initialisations differ between layouts: start from one)
    run_pretrain(tiny_args(prefix, str(tmp_path / "base.jsonl"), 3, "--save", base))
    start = ("--pretrained-checkpoint", base)
    whole = read_steps_of(prefix, tmp_path / "pp1.jsonl", 4, *start)
    layouts = {"E|ttttL": ("E|ttttL", None), "Et*2|(t|)*2L": ("Ett|t|t|L", 2)}
    for i, (layout, (written_out, virtual)) in enumerate(layouts.items()):
        save, log = str(tmp_path / f"ckpt{i}"), tmp_path / f"layout{i}.jsonl"
        argv = ("--pipeline-model-parallel-size", 2, "--pipeline-model-parallel-layout", layout,
                "--use-distributed-optimizer", *start, "--save", save)  # fmt: skip
        run_pretrain(tiny_args(prefix, str(log), 4, *argv, "--save-interval", 4), nproc=2)
        for a, b in zip(whole, read_steps(str(log)), strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0), layout
        recorded = read_metadata(iteration_dir(save, 4))["optimizer_layout"]
        assert recorded["pipeline_model_parallel_layout"] == written_out
        assert recorded["virtual_pipeline_size"] == virtual


def test_log_interval_reads_late_but_records_every_step(corpus, tmp_path):
    """--log-interval 3: the host reads statistics at steps 3, 6 and the last only, yet every
    step's record is written, with the same values as reading every step; a clean exit between
    log steps (--exit-interval 4) writes its pending records, and the resumed run continues."""
    _, prefix = corpus
    every = read_steps_of(prefix, tmp_path / "every.jsonl", 8)
    late = ("--log-interval", 3)
    log = tmp_path / "late.jsonl"
    proc = run_pretrain(tiny_args(prefix, str(log), 8, *late))
    assert [line.split("/")[0].split()[-1] for line in proc.stdout.splitlines()
            if line.startswith("iter ")] == ["3", "6", "8"]  # fmt: skip
    ckpt = str(tmp_path / "ckpt")
    split = tmp_path / "split.jsonl"
    run_pretrain(tiny_args(prefix, str(split), 8, *late, "--save", ckpt, "--exit-interval", 4))
    assert [r["iteration"] for r in read_steps(str(split))] == [1, 2, 3, 4]
    run_pretrain(tiny_args(prefix, str(split), 8, *late, "--load", ckpt))
    for records in (read_steps(str(log)), read_steps(str(split))):
        assert [r["iteration"] for r in records] == list(range(1, 9))
        for a, b in zip(every, records):
            assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"])
            assert a["consumed_samples"] == b["consumed_samples"]


def test_a_longer_run_resumes_only_on_a_schedule_it_names(corpus, tmp_path):
    """Raising --train-iters (and the rates) on resume changes the schedule: refused before any
    work, naming what differs, unless --override-opt-param-scheduler, which trains on the new
    schedule from the saved step on: megatron-core's scheduler built on it gives the same rates
    (megatron-core alone would keep the saved schedule's, here its final 0 from step 4 on)."""
    _, prefix = corpus
    ckpt = str(tmp_path / "ckpt")
    run_pretrain(tiny_args(prefix, str(tmp_path / "a.jsonl"), 3, "--save", ckpt))
    longer = ("--lr", "6e-3", "--min-lr", "1e-4", "--lr-decay-style", "linear", "--load", ckpt)
    proc = run_pretrain(tiny_args(prefix, str(tmp_path / "b.jsonl"), 6, *longer), check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "--lr-decay-iters (default: the training steps) saved 3, this run 6" in errors[0]
    log = tmp_path / "c.jsonl"
    run_pretrain(tiny_args(prefix, str(log), 6, *longer, "--override-opt_param-scheduler"))
    resumed = read_steps(str(log))
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    expected = megatron_rates(
        6, 1, max_lr=6e-3, min_lr=1e-4, lr_warmup_steps=2, lr_decay_steps=6,
        lr_decay_style="linear", wd_incr_steps=6,
    )  # fmt: skip
    assert [r["lr"] for r in resumed] == expected[3:]


def _in_samples(prefix, log, *extra):
    """tiny_args with the run's length and warmup in Megatron-LM's sample-based flags."""
    argv = tiny_args(prefix, str(log), 1, *extra)
    for flag in ("--train-iters", "--lr-warmup-iters"):
        i = argv.index(flag)
        del argv[i : i + 2]
    return argv


def test_a_schedule_in_samples_trains_and_resumes(corpus, tmp_path):
    """--train-samples 44 at 8 a step: 5 steps; the warmup, a fraction of the 40 decay samples,
    is 1.5 steps. The logged rates are Megatron-LM's (megatron-core's scheduler counting
    samples), also after a stop at step 2 and a resume, which reads the fractional schedule back
    from the checkpoint's record."""
    _, prefix = corpus
    ckpt, log = str(tmp_path / "ckpt"), tmp_path / "steps.jsonl"
    flags = ("--train-samples", 44, "--lr-decay-samples", 40, "--lr-warmup-fraction", "0.3",
             "--lr-decay-style", "linear", "--min-lr", "1e-4", "--save", ckpt)  # fmt: skip
    run_pretrain(_in_samples(prefix, log, *flags, "--exit-interval", 2))
    run_pretrain(_in_samples(prefix, log, *flags, "--load", ckpt))
    steps = read_steps(str(log))
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4, 5]
    expected = megatron_rates(
        5, 8, max_lr=3e-3, min_lr=1e-4, lr_warmup_steps=0.3 * 40, lr_decay_steps=40,
        lr_decay_style="linear", wd_incr_steps=44,
    )  # fmt: skip
    assert [r["lr"] for r in steps] == pytest.approx(expected, rel=1e-12)
    assert expected[0] == pytest.approx(2e-3)  # 8 of the 12 warmup samples


def test_resume_tp1_checkpoint_at_tp2(corpus, tmp_path):
    """And Megatron-LM's log-step figures across tensor parallelism: the norm of the weights
    counts the copies of the replicated ones (norms) once, and the gradients' zeros are summed
    over the vocabulary shards (the embedding rows of ids a step does not see)."""
    _, prefix = corpus
    figures = ("--log-params-norm", "--log-num-zeros-in-grad")
    straight = read_steps_of(prefix, tmp_path / "tp1.jsonl", 6, *figures)
    ckpt = str(tmp_path / "ckpt")
    read_steps_of(prefix, tmp_path / "a.jsonl", 6, "--save", ckpt, "--exit-interval", 3)
    tp2 = read_steps_of(
        prefix, tmp_path / "tp2.jsonl", 6, "--load", ckpt,
        "--tensor-model-parallel-size", 2, *figures, nproc=2,
    )  # fmt: skip
    assert [r["iteration"] for r in tp2] == [4, 5, 6]
    for a, b in zip(straight[3:], tp2):
        assert a["consumed_samples"] == b["consumed_samples"]
        # fp32 reduction order differs across TP: agreement to fp32 accuracy over a few steps.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["params_norm"] == pytest.approx(a["params_norm"], rel=1e-5)
        assert b["num_zeros_in_grad"] == a["num_zeros_in_grad"] > 0


def test_sequence_parallel_and_recompute_leave_the_losses_unchanged(corpus, tmp_path):
    """The 7B launch script's settings at TP > 1: sequence parallelism (activations sharded
    along the sequence, all-gathered before and reduce-scattered after each TP region, also in
    the backward) and full activation recompute change where values live and when they are
    computed, not the values."""
    _, prefix = corpus
    tp2 = ("--tensor-model-parallel-size", 2, "--clip-grad", 0)
    plain = read_steps_of(prefix, tmp_path / "tp2.jsonl", 4, *tp2, nproc=2)
    both = read_steps_of(
        prefix, tmp_path / "sp.jsonl", 4, *tp2, "--sequence-parallel",
        "--recompute-granularity", "full", nproc=2,
    )  # fmt: skip
    # Not bitwise: with the sequence split, each rank sums the norm weights' gradients over its
    # half of the sequence before the all-reduce, a different order of fp32 sums. Equal on the
    # Intel machines CI has run on; 1 fp32 ulp off at step 4 on an AMD EPYC (Zen 4). A missed
    # gather or reduction is off by far more than a few ulps after a step.
    for a, b in zip(plain, both, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0)
    assert plain[-1]["loss"] < plain[0]["loss"]


def test_tensorboard_has_slm_scalars(corpus, reference_ckpt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, prefix = corpus
    tb = tmp_path / "tb"
    steps = read_steps_of(
        prefix, tmp_path / "tb.jsonl", 3, "--slm-ratio", "0.6",
        "--slm-ref-source", "online", "--slm-ref-load", reference_ckpt,
        "--tensorboard-dir", tb, "--log-selection-interval", 2,
    )  # fmt: skip
    acc = EventAccumulator(
        str(tb), size_guidance={"histograms": 0, "scalars": 0, "images": 0}
    ).Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Images("slm/selection")] == [2]  # --log-selection-interval 2
    for tag in ("loss", "selected_loss", "selected_fraction", "excess_loss", "excess_selected",
                "excess_unselected", "lr", "grad_norm"):  # fmt: skip
        events = acc.Scalars(f"slm/{tag}")
        assert [e.step for e in events] == [1, 2, 3]
        for event, step in zip(events, steps):
            if not math.isnan(step[tag]):
                assert event.value == pytest.approx(step[tag], rel=1e-6)
    assert "slm/excess_loss_selected" in tags["histograms"]


def _copy_dataset(prefix, directory) -> str:
    import shutil

    os.makedirs(directory, exist_ok=True)
    copy = os.path.join(str(directory), os.path.basename(prefix))
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, copy + ext)
    return copy


def test_ablation_modes_log_measured_excess(corpus, reference_ckpt, online_steps, tmp_path):
    """``random`` selection with a sidecar logs the measured excess (it used to log 0.0000): at
    step 1 every run has the same weights and batch, so the mean excess over all tokens equals the
    excess-mode run's (online reference = the same values), and the selected and unselected means
    partition it. Without a sidecar the console says n/a."""
    _, prefix = corpus
    scored = _copy_dataset(prefix, tmp_path / "scored")
    run_distributed(_score_documents, 1, reference_ckpt, scored)
    ablation = ("--slm-ratio", "0.5", "--slm-select-mode", "random")
    # 3 steps: the shortest run the warmup of tiny_args allows; step 1 is compared.
    step = read_steps_of(scored, tmp_path / "random.jsonl", 3, *ablation)[0]
    assert step["excess_loss"] == pytest.approx(online_steps[0]["excess_loss"], rel=1e-4)
    sel, unsel = step["excess_selected"], step["excess_unselected"]
    assert math.isfinite(sel) and math.isfinite(unsel) and sel != unsel
    assert min(sel, unsel) < step["excess_loss"] < max(sel, unsel)
    # A blend of two sidecar-less copies: n/a, and each source's selected share (random: ~0.5).
    a, b = _copy_dataset(prefix, tmp_path / "a"), _copy_dataset(prefix, tmp_path / "b")
    blend = ("--data-path", "0.5", a, "0.5", b)
    proc = run_pretrain(tiny_args(a, str(tmp_path / "bare.jsonl"), 3, *ablation, *blend))
    assert "excess sel./unsel. n/a / n/a" in proc.stdout
    step = read_steps(str(tmp_path / "bare.jsonl"))[0]
    assert math.isnan(step["excess_selected"])
    shares = step["selected_fraction_by_source"]
    assert sorted(shares) == sorted([a, b]) and all(0.3 < v < 0.7 for v in shares.values())


def test_bad_configuration_fails_before_training(corpus, reference_ckpt, tmp_path):
    _, prefix = corpus
    other = make_null_corpus(str(tmp_path), "bigvocab", [20] * 4)
    cases = [
        (("--global-batch-size", 7), "--global-batch-size 7"),
        (("--lr-warmup-iters", 5), "--lr-warmup-iters 5"),
        (("--bf16",), "--bf16 needs a GPU"),
        (("--tensor-model-parallel-size", 3), "world size 1 is not divisible"),
        (("--slm-ratio", "1.5"), "--slm-ratio"),
        (("--slm-ratio", "0.5"), "sidecar"),  # no sidecar next to this prefix
        (("--slm-ratio", "0.5", "--slm-ref-source", "online"), "--slm-ref-load"),
        (
            ("--slm-ratio", "0.5", "--slm-ref-source", "online", "--slm-ref-load", "/nonexistent"),
            "--slm-ref-load /nonexistent",
        ),
    ]
    for extra, message in cases:
        proc = run_pretrain(tiny_args(other, str(tmp_path / "x.jsonl"), 4, *extra), check=False)
        assert proc.returncode != 0, extra
        assert message in proc.stderr, (extra, proc.stderr[-2000:])
        assert not os.path.exists(tmp_path / "x.jsonl"), "failed after training started"
    # A reference model whose vocabulary differs from the data's tokenizer.
    proc = run_pretrain(
        tiny_args(other, str(tmp_path / "x.jsonl"), 4, "--slm-ratio", "0.5", "--vocab-size", 1024)
        + ["--slm-ref-source", "online", "--slm-ref-load", reference_ckpt],
        check=False,
    )
    assert proc.returncode != 0 and "vocabulary" in proc.stderr, proc.stderr[-2000:]


def test_parameter_inheritance_refuses_gpt3s_architecture(gpt3_reference, tmp_path):
    """Inheritance's slicing rules are Llama's (RMSNorm, [gate; up]): a GPT-3 source is one
    line, exit status 2, before any work."""
    import sys

    from tests.functional.pretrain_helpers import REPO

    _, ckpt = gpt3_reference
    tool = os.path.join(REPO, "tools", "inherit_parameters.py")
    proc = zygote.run(
        [sys.executable, tool, "--load", ckpt, "--save", str(tmp_path / "small"),
         "--num-layers", "2", "--device", "cpu"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "parameter inheritance takes Llama's architecture" in proc.stderr.strip().splitlines()[-1]
    )
    assert "GPT-3 architecture (LayerNorm, GeLU, learned positions" in proc.stderr
    assert not os.path.exists(tmp_path / "small")


# A mixture of experts in layers 0, 2 and 3 (pipeline stage 0: a mixture and a dense layer,
# stage 1: two mixtures): 4 SwiGLU experts, top-2 routing, a gated shared expert beside them,
# both auxiliary losses.
MOE = ("--num-experts", 4, "--moe-router-topk", 2, "--moe-aux-loss-coeff", "1e-2",
       "--moe-z-loss-coeff", "1e-3", "--moe-layer-freq", "[1,0,1,1]",
       "--moe-shared-expert-intermediate-size", 32, "--moe-shared-expert-gate",
       "--moe-per-layer-logging")  # fmt: skip


def test_tp_pp_dp_mapping_trains_alike_and_is_recorded(corpus, tmp_path):
    """--use-tp-pp-dp-mapping (Megatron-LM's flag; the layouts themselves:
    tests/unit/test_launch_layout.py): PP 2 x DP 2 over 4 ranks gives the default order's steps;
    its checkpoint records the order, and resumed in the other order the random states, one file
    per global rank, stay this run's."""
    from megatron_slm.checkpoint import iteration_dir, read_metadata

    _, prefix = corpus
    layout = ("--pipeline-model-parallel-size", 2)
    plain = read_steps_of(prefix, tmp_path / "plain.jsonl", 3, *layout, nproc=4)
    ckpt = str(tmp_path / "ckpt")
    mapped = read_steps_of(
        prefix, tmp_path / "mapped.jsonl", 3, *layout, "--use-tp-pp-dp-mapping", "--save", ckpt,
        "--save-interval", 2, nproc=4,
    )  # fmt: skip
    for a, b in zip(plain, mapped, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0)
    assert read_metadata(iteration_dir(ckpt, 2))["rank_order"] == "tp-cp-ep-pp-dp"
    log = str(tmp_path / "resumed.jsonl")
    argv = tiny_args(prefix, log, 3, *layout, "--load", ckpt, "--ckpt-step", 2)
    proc = run_pretrain(argv, nproc=4)
    assert "parallel layout differs from the checkpoint's: RNG states not restored" in proc.stderr
    assert read_steps(log)[0]["loss"] == pytest.approx(mapped[2]["loss"], rel=1e-5, abs=0)


MIXTURE = ("--num-experts", 4, "--moe-router-topk", 2)
UPCYCLE = (*MIXTURE, "--moe-use-upcycling")


def test_pretrained_checkpoint_starts_a_fine_tuning_that_resumes(corpus, reference_ckpt, tmp_path):
    """--pretrained-checkpoint (Megatron-LM's flag) in the restart idiom (--load = --save): the
    first run starts from its weights as --finetune does, stops after 2 of 4 steps, and the same
    command then resumes from --save; the steps are the straight --finetune run's."""
    from megatron_slm.checkpoint import iteration_dir, read_metadata

    _, prefix = corpus
    straight = read_steps_of(prefix, tmp_path / "straight.jsonl", 4, "--load", reference_ckpt,
                             "--finetune")  # fmt: skip
    save = str(tmp_path / "ft")
    same = ("--pretrained-checkpoint", reference_ckpt, "--load", save, "--save", save)
    log = tmp_path / "ft.jsonl"
    proc = run_pretrain(tiny_args(prefix, str(log), 4, *same, "--exit-interval", 2))
    assert f"fine-tuning from --pretrained-checkpoint {reference_ckpt}" in proc.stderr
    assert read_metadata(iteration_dir(save, 2))["config"]["checkpoint"]["finetune"] is True
    proc = run_pretrain(tiny_args(prefix, str(log), 4, *same))
    assert "fine-tuning from" not in proc.stderr
    steps = read_steps(str(log))
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4]
    assert [r["loss"] for r in steps] == [r["loss"] for r in straight]
    # Without --load: the pretrained weights start the run too (its first step, the same batch).
    alone = read_steps_of(prefix, tmp_path / "alone.jsonl", 3, "--pretrained-checkpoint",
                          reference_ckpt)  # fmt: skip
    assert alone[0]["loss"] == straight[0]["loss"]


def test_upcycling_starts_a_mixture_from_the_dense_checkpoint(corpus, reference_ckpt, tmp_path):
    """--moe-use-upcycling (Megatron-LM's flag): the dense reference model's weights in a mixture
    of 4 experts, each the dense MLP, top-2 weights summing to 1, so its first step's loss is the
    dense model's on that batch; the mixture is saved as step 0 before that step, and a run from
    that save (the flag dropped, no --no-load-optim) repeats the steps. Granular upcycling makes
    the same mixture at TP 2 with sequence parallelism, at PP 2 and with 2 expert-parallel ranks
    (the tokens dispatched by all-gather or by all-to-all) as at TP 1 (the same steps).
    Upcycling into a --save holding a checkpoint is refused."""
    from megatron_slm.checkpoint import iteration_dir, read_metadata

    _, prefix = corpus
    load = ("--load", reference_ckpt)
    dense = read_steps_of(prefix, tmp_path / "dense.jsonl", 3, *load, "--finetune")
    save = str(tmp_path / "moe")
    moe = read_steps_of(prefix, tmp_path / "moe.jsonl", 3, *UPCYCLE, *load, "--save", save)
    assert moe[0]["loss"] == pytest.approx(dense[0]["loss"], rel=1e-6, abs=0)
    assert moe[-1]["loss"] < moe[0]["loss"]
    meta = read_metadata(iteration_dir(save, 0))
    assert (meta["model"]["num_experts"], meta["optimizer_saved"]) == (4, False)
    assert meta["upcycled_from"]["granularity"] == 1 and meta["consumed_samples"] == 0
    from_save = ("--load", save, "--ckpt-step", 0)
    again = read_steps_of(prefix, tmp_path / "again.jsonl", 3, *MIXTURE, *from_save)
    assert [r["loss"] for r in again] == [r["loss"] for r in moe]
    # Granular upcycling (6 experts of half the width, 3 copies of the MLP): each layout's
    # experts are the slices of their global index, and its routers the same.
    granular = (*UPCYCLE, "--num-experts", 6, "--moe-upcycling-granularity", 2, *load)
    ep2 = ("--expert-model-parallel-size", 2)
    layouts = {
        "tp1": (),
        "tp2": ("--tensor-model-parallel-size", 2, "--sequence-parallel"),
        "pp2": ("--pipeline-model-parallel-size", 2),
        "ep2": ep2,
        "ep2-alltoall": (*ep2, "--moe-token-dispatcher-type", "alltoall"),
    }
    runs = {}
    for name, layout in layouts.items():
        other = ("--save", str(tmp_path / name))
        runs[name] = read_steps_of(
            prefix,
            tmp_path / f"{name}.jsonl",
            3,
            *granular,
            *other,
            *layout,
            nproc=1 + bool(layout),
        )
    for name in ("tp2", "pp2", "ep2", "ep2-alltoall"):
        for a, b in zip(runs["tp1"], runs[name], strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0), name
    proc = run_pretrain(
        tiny_args(prefix, str(tmp_path / "x.jsonl"), 3, *UPCYCLE, *load, "--save", save),
        check=False,
    )
    assert proc.returncode == 2
    assert f"--moe-use-upcycling: --save {save} holds a checkpoint already" in proc.stderr


def test_expert_tensor_parallel_size_trains_alike(corpus, reference_ckpt, tmp_path):
    """--expert-tensor-parallel-size 1 at TP 2 (Megatron-LM's flag) with 2 expert-parallel
    ranks: each expert whole on its rank while the dense layers are split, the steps of TP 1
    from the same upcycled mixture (the same at any layout); the optimizer layout records it.
    (At EP 1 megatron-core 0.16 leaves the experts' gradients unreduced over the TP peers: its
    steps drift from TP 1's at step 3, hence the refusal.)"""
    from megatron_slm.checkpoint import iteration_dir, read_metadata

    _, prefix = corpus
    start = (*UPCYCLE, "--load", reference_ckpt, "--use-distributed-optimizer")
    layout = ("--tensor-model-parallel-size", 2, "--sequence-parallel",
              "--expert-tensor-parallel-size", 1, "--expert-model-parallel-size", 2)  # fmt: skip
    tp1 = read_steps_of(prefix, tmp_path / "tp1.jsonl", 3, *start, "--save", tmp_path / "a")
    save = str(tmp_path / "etp1")
    etp1 = read_steps_of(prefix, tmp_path / "etp1.jsonl", 3, *start, *layout, "--save", save,
                         nproc=2)  # fmt: skip
    for a, b in zip(tp1, etp1, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0)
    record = read_metadata(iteration_dir(save, 3))
    assert record["optimizer_layout"]["expert_tensor_parallel_size"] == 1
    assert record["expert_tensor_parallel_size"] == 1
    # The checkpoint is layout-free: at TP 1 its experts are TP 1's checkpoint's.
    later = [read_steps_of(prefix, tmp_path / f"{name}-later.jsonl", 3, *MIXTURE, "--load",
                           ckpt, "--finetune")[0]["loss"]
             for name, ckpt in (("tp1", tmp_path / "a"), ("etp1", save))]  # fmt: skip
    assert later[1] == pytest.approx(later[0], rel=1e-5, abs=0)


# DeepSeek-V3's auxiliary-loss-free balancing: sigmoid scores, a per-expert bias.
BIASED = ("--num-experts", 4, "--moe-router-topk", 2, "--moe-router-score-function", "sigmoid",
          "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-2")  # fmt: skip


def _expert_biases(rank, world, ckpt):
    from megatron_slm.launch import initialize
    from megatron_slm.models.sharding import full_state_dict
    from megatron_slm.runtime import LoadArgs, load_model, plan_load

    lm = load_model(plan_load(LoadArgs(load=ckpt), tokenizer="none"), initialize(device="cpu"))
    state = full_state_dict(lm.chunks[0])
    return torch.stack([v for k, v in sorted(state.items()) if k.endswith("router.expert_bias")])


def test_expert_bias_balances_over_data_parallel_ranks_and_resumes(corpus, tmp_path):
    """--moe-router-enable-expert-bias: each step every expert's bias moves by the update rate
    (or stays, at the mean), by the tokens of all micro-batches and data-parallel ranks (DP 2
    gives DP 1's steps: with each rank's own counts its biases, and so its routing, would part);
    the biases are saved with the model (a resumed run gives the same steps)."""
    _, prefix = corpus
    ckpt = str(tmp_path / "ckpt")
    straight = read_steps_of(
        prefix, tmp_path / "straight.jsonl", 4, *BIASED, "--save", ckpt, "--save-interval", 2
    )
    resumed = read_steps_of(
        prefix, tmp_path / "resumed.jsonl", 4, *BIASED, "--load", ckpt, "--ckpt-step", 2
    )
    assert [r["iteration"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[2:]]
    two = read_steps_of(prefix, tmp_path / "dp2.jsonl", 4, *BIASED, nproc=2)
    for a, b in zip(straight, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0)
    ((biases,),) = [run_distributed(_expert_biases, 1, ckpt)]
    steps = biases * 100  # four steps of +-1e-2 (or 0) each
    assert biases.shape == (4, 4) and steps.abs().max() <= 4 + 1e-4 and steps.abs().max() > 0
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)


def _moe_scores_vs_forward(rank, world, ckpt, prefix):
    """Largest difference between the scorer's sidecar and each document forwarded alone."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_slm import launch
    from megatron_slm.checkpoint import load_checkpoint, read_checkpoint
    from megatron_slm.data.sidecar import SidecarReader
    from megatron_slm.models import ModelBuildOptions, build_model

    launch.initialize(device="cpu")
    (model,) = build_model(read_checkpoint(ckpt).model, ModelBuildOptions())
    load_checkpoint(ckpt, [model], weights_only=True)
    model.eval()
    ds, sidecar = IndexedDataset(prefix), SidecarReader(prefix)
    worst = 0.0
    with torch.no_grad():
        for i in range(0, len(ds), 8):
            doc = torch.from_numpy(ds[i].astype(np.int64))[None]
            pos = torch.arange(doc.shape[1] - 1)[None]
            loss = model(doc[:, :-1], pos, None, labels=doc[:, 1:])[0].numpy()
            worst = max(worst, float(np.abs(sidecar.get(i)[1:] - loss).max()))
    return worst


def test_mixture_of_experts_trains_resumes_and_scores(corpus, tmp_path):
    """--num-experts: megatron-core's MoE layers (with a dense layer and a gated shared expert)
    train under selective training, log their auxiliary losses (the Switch load-balancing loss,
    averaged over the layers with a mixture, is 1 for balanced routing and at most
    experts / top-k), resume exactly, give the same losses over TP 2 with sequence parallelism,
    over PP 2 and with the experts sharded over 2 ranks (--expert-model-parallel-size), and the
    checkpoint scores as a direct forward of its model does."""
    import shutil

    root, prefix = corpus
    slm = ("--slm-ratio", "0.7", "--slm-select-mode", "loss")
    straight = read_steps_of(prefix, tmp_path / "straight.jsonl", 6, *MOE, *slm)
    assert straight[-1]["loss"] < straight[0]["loss"]
    for r in straight:
        assert 1.0 - 1e-6 <= r["moe_load_balancing_loss"] <= 4 / 2, r
        assert r["moe_z_loss"] > 0, r
        # --moe-per-layer-logging: each mixture's own (layer 1 is dense), their mean the above
        layers = [r[f"moe_load_balancing_loss_layer_{i}"] for i in (0, 2, 3)]
        assert "moe_load_balancing_loss_layer_1" not in r and min(layers) >= 1.0 - 1e-6
        assert sum(layers) / 3 == pytest.approx(r["moe_load_balancing_loss"], rel=1e-6)
    ckpt = str(tmp_path / "ckpt")
    stopped = (*MOE, *slm, "--save", ckpt, "--save-interval", 3, "--exit-interval", 3)
    read_steps_of(prefix, tmp_path / "resumed.jsonl", 6, *stopped)
    resumed = read_steps_of(prefix, tmp_path / "resumed.jsonl", 6, *MOE, *slm, "--load", ckpt)
    assert [r["iteration"] for r in resumed] == list(range(1, 7))
    for a, b in zip(straight, resumed, strict=True):
        assert (a["loss"], a["moe_load_balancing_loss"]) == (
            b["loss"],
            b["moe_load_balancing_loss"],
        )
    # The step-3 checkpoint resumed at TP 2 and at PP 2 (megatron-core seeds each TP rank's
    # experts and each stage's layers apart, so runs from scratch differ): steps 4-6 and their
    # auxiliary losses (reduced over the TP shards, and over the stages' layers) as at TP 1.
    for name, layout in (("tp2", ("--tensor-model-parallel-size", 2, "--sequence-parallel")),
                         ("pp2", ("--pipeline-model-parallel-size", 2))):  # fmt: skip
        log = tmp_path / f"{name}.jsonl"
        sharded = read_steps_of(prefix, log, 6, *MOE, *slm, *layout, "--load", ckpt, nproc=2)
        assert [r["iteration"] for r in sharded] == [4, 5, 6]
        for a, b in zip(straight[3:], sharded, strict=True):
            for key in ("loss", "moe_load_balancing_loss", "moe_z_loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=0), (name, key)
    # Expert parallelism (2 ranks, 2 experts each) from the same weights with a fresh Adam: TP 1's
    # steps; its own checkpoint (the experts' optimizer apart) resumes exactly; the TP 1 one's
    # optimizer state (the experts' with the rest) is refused in one line.
    fresh = (*MOE, *slm, "--load", ckpt, "--no-load-optim")
    single = read_steps_of(prefix, tmp_path / "ep1.jsonl", 6, *fresh)
    ep2, ep2_ckpt = ("--expert-model-parallel-size", 2), str(tmp_path / "ep2_ckpt")
    stop = ("--save", ep2_ckpt, "--save-interval", 5, "--exit-interval", 5)
    log = tmp_path / "ep2.jsonl"
    read_steps_of(prefix, log, 6, *fresh, *ep2, *stop, nproc=2)
    experts = read_steps_of(prefix, log, 6, *MOE, *slm, *ep2, "--load", ep2_ckpt, nproc=2)
    assert [r["iteration"] for r in experts] == [4, 5, 6]
    for a, b in zip(single, experts, strict=True):
        for key in ("loss", "grad_norm", "moe_load_balancing_loss", "moe_z_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=0), ("ep2", key)
    proc = run_pretrain(
        tiny_args(prefix, str(tmp_path / "x.jsonl"), 6, *MOE, *ep2, "--load", ckpt),
        nproc=2, check=False,
    )  # fmt: skip
    assert proc.returncode != 0  # (each rank exits 2; torchrun says 1)
    assert "saved at --expert-model-parallel-size 1" in proc.stderr, proc.stderr[-2000:]
    # The scorer loads the mixture like any checkpoint (on a copy of the corpus: the module's
    # other tests read its own sidecar).
    copy = str(tmp_path / "copy")
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, copy + ext)
    _score_with_tool(ckpt, copy)
    ((worst,),) = [run_distributed(_moe_scores_vs_forward, 1, ckpt, copy)]
    assert worst < 1e-4
