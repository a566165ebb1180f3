"""Multi-token prediction (``--mtp-num-layers``, ``--mtp-loss-scaling-factor``): the trainer's
logged losses and gradient norm against an independent float64 computation of DeepSeek-V3's
objective (each head composed by hand from the model's modules, torch's cross entropy), under
Rho-1's selection too, with heads added to a checkpoint without, and on rows of several
documents against each document alone; TP 2 with sequence
parallelism and DP 2 give TP 1's steps; checkpoints resume and refuse another head count. CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.functional.pretrain_helpers import (
    close_trainer,
    cpu_trainer,
    documents_and_checkpoint,
    read_steps,
    refusal,
    run_pretrain,
    tiny_args,
)

pytestmark = pytest.mark.slow
STEPS = 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # (with --eod-mask-loss the loss mask has holes, which the heads' targets follow shifted)
    return documents_and_checkpoint(tmp_path_factory.mktemp("mtp"), 3)


def _head_logits(model, tokens, positions):
    """``[s, b, v]`` logits of the main head, then of each MTP head k (DeepSeek-V3: the k-th
    head joins the (k-1)-th's normed hidden state with the normed embedding of the input k
    tokens ahead, projects them, runs its transformer layer and final norm, and shares the
    output layer)."""
    import torch.nn.functional as F

    s = tokens.shape[1]
    rope = model.rotary_pos_emb(s)
    hidden = model.decoder(
        hidden_states=model.embedding(input_ids=tokens, position_ids=positions),
        attention_mask=None,
        rotary_pos_emb=rope,
    )
    logits = [model.output_layer(hidden)[0]]
    ahead, ahead_positions = tokens, positions
    for head in model.mtp.layers:
        ahead = F.pad(ahead[:, 1:], (0, 1))  # id 0 past the end (masked out below)
        ahead_positions = F.pad(ahead_positions[:, 1:], (0, 1))
        embedded = model.embedding(input_ids=ahead, position_ids=ahead_positions)
        joined = torch.cat([head.enorm(embedded), head.hnorm(hidden)], dim=-1)
        x = head.eh_proj(joined)[0]
        x = head.transformer_layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)[0]
        hidden = head.final_layernorm(x)
        logits.append(model.output_layer(hidden)[0])
    return logits


def _documents(batch, eod):
    """A packed micro-batch cut into its documents (each ends with its EOD token; SFT rows: at
    each change of example), each one a ``[1, len]`` micro-batch of its own: the model sees
    each document alone."""
    tokens = batch["tokens"]
    for row in range(tokens.shape[0]):
        if "segment_ids" in batch:
            segments = batch["segment_ids"][row]
            starts = (segments[1:] != segments[:-1]).nonzero().flatten() + 1
        else:
            starts = (tokens[row, :-1] == eod).nonzero().flatten() + 1
        bounds = [0] + starts.tolist()
        for start, stop in zip(bounds, bounds[1:] + [tokens.shape[1]]):
            yield {key: batch[key][row : row + 1, start:stop] for key in PIECE_KEYS}


PIECE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _expected(trainer, factor, ratio, alone=False):
    """The next step in float64: the logged main loss and each head's mean loss, and the
    gradient norm of (main sum over the trained tokens + factor x ratio / N x each head's sum over
    the loss mask shifted k) / trained tokens. ``alone``: each document of a packed row computed
    by itself (a head's targets end with its document)."""
    import torch.nn.functional as F

    from megatron_slm.models import build_model
    from megatron_slm.models.sharding import unwrap
    from megatron_slm.training.data import MicroBatches

    model = unwrap(trainer.chunks[0])
    copy = build_model(trainer.arch, trainer.build_opts, device=trainer.device)[0].double()
    weights = {k: v.double() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    missing, unexpected = copy.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
    n_heads = len(copy.mtp.layers)
    weight = factor * (1.0 if ratio is None else ratio) / n_heads
    peek = MicroBatches(
        trainer.train_ds, trainer.cfg.training.micro_batch_size, trainer.batches.consumed_samples
    )
    total, trained = 0.0, 0
    sums = torch.zeros(1 + n_heads, 2, dtype=torch.float64)  # (loss sum, tokens) per head
    pieces = []
    for _ in range(trainer.sizes.num_microbatches):
        batch = next(peek)
        pieces += list(_documents(batch, trainer.tokenizer.eod)) if alone else [batch]
    assert not alone or (ratio is None and len(pieces) > 2 * trainer.sizes.num_microbatches)
    for batch in pieces:
        labels, mask = batch["labels"], batch["loss_mask"].double()  # [b, s]
        logits = _head_logits(copy, batch["tokens"], batch["position_ids"])
        for k, head in enumerate(logits):  # head k at position t: the label of t + k
            past = min(k, labels.shape[1])  # (a document shorter than the heads: none)
            target, weights_k = F.pad(labels[:, k:], (0, past)), F.pad(mask[:, k:], (0, past))
            ce = F.cross_entropy(
                head.transpose(0, 1).flatten(0, 1), target.flatten(), reduction="none"
            ).view_as(mask)
            head_sum = (ce * weights_k).sum()
            sums[k] += torch.stack([head_sum.detach(), weights_k.sum()])
            if k:
                total = total + weight * head_sum
                continue
            chosen = mask
            if ratio is not None:  # --slm-select-mode loss: the top of each micro-batch by loss
                top = torch.where(mask.bool(), ce.detach(), -torch.inf).flatten()
                top = top.topk(math.floor(ratio * int(mask.sum()) + 0.5)).indices  # (half up)
                chosen = torch.zeros_like(mask).flatten().index_fill_(0, top, 1.0).view_as(mask)
            total = total + (ce * chosen).sum()
            trained += int(chosen.sum())
    (total / trained).backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in copy.parameters() if p.grad is not None))
    means = (sums[:, 0] / sums[:, 1]).tolist()
    return means[0], means[1:], norm.item()


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Chat examples for --sft-data (rows pack several) and their SentencePiece model."""
    from megatron_slm.data import train_sentencepiece

    root = tmp_path_factory.mktemp("mtp_sft")
    words = "keep drop the line menu spam text about cats and dogs".split()
    model = train_sentencepiece([" ".join(words) + "\n<|user|> <|assistant|>"] * 20,
                                str(root / "sp"), 300)  # fmt: skip
    rows = []
    for i in range(24):
        question = " ".join(words[(i + j) % len(words)] for j in range(1 + i % 5))
        chat = [{"role": "user", "content": question},
                {"role": "assistant", "content": words[i % len(words)]}]  # fmt: skip
        rows.append(json.dumps({"messages": chat}))
    (root / "chat.jsonl").write_text("\n".join(rows) + "\n")
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
            "--sft-data", str(root / "chat.jsonl")]  # fmt: skip


def _worker(rank, world, prefix, plain, log_file, case):
    from tests.functional.pretrain_helpers import read_steps

    extra = ["--mtp-num-layers", 2, "--mtp-loss-scaling-factor", 0.5]
    if case != "packed-examples":  # (SFT rows mask their own loss)
        extra.append("--eod-mask-loss")
    ratio = 0.5 if case == "selected-tokens" else None
    if ratio is not None:
        extra += ["--slm-ratio", ratio, "--slm-select-mode", "loss"]
    if case == "added-heads":
        extra += ["--load", plain, "--finetune"]
    if case == "packed-documents":
        extra += ["--reset-attention-mask", "--reset-position-ids"]
    trainer = cpu_trainer(tiny_args(prefix, log_file, 2 * STEPS, *extra))
    loaded = None
    if case == "added-heads":  # the main model's weights are the checkpoint's, the heads new
        from megatron_slm.checkpoint import load_checkpoint, read_checkpoint
        from megatron_slm.models import ModelBuildOptions, build_model
        from megatron_slm.models.sharding import unwrap

        (reference,) = build_model(read_checkpoint(plain).model, ModelBuildOptions())
        load_checkpoint(plain, [reference], weights_only=True)
        mine = unwrap(trainer.chunks[0]).state_dict()
        theirs = reference.state_dict()
        loaded = [torch.equal(mine[k], v) for k, v in theirs.items() if torch.is_tensor(v)]
        loaded.append(any(k.startswith("mtp.") for k in mine))
    expected = []
    for _ in range(STEPS):
        expected.append(_expected(trainer, 0.5, ratio, alone=case.startswith("packed")))
        assert trainer.advance() is None
    close_trainer(trainer)
    return expected, read_steps(log_file), loaded


@pytest.mark.parametrize(
    "case", ["plain", "selected-tokens", "added-heads", "packed-documents", "packed-examples"]
)
def test_losses_and_gradient_are_an_independent_computation(corpus, examples, tmp_path, case):
    """Each step's logged main loss, heads' losses and gradient norm (the gradient of the loss
    the trainer optimises) equal the independent computation's; rows of several documents
    (--reset-attention-mask) or examples (--sft-data) equal each one computed alone (examples
    start with their prompt, outside the loss mask: there the shifted mask alone keeps the heads
    inside an example)."""
    prefix, plain = corpus
    if case == "packed-examples":  # (the SFT flags instead of a corpus)
        prefix = examples
    log = str(tmp_path / "mtp.jsonl")
    ((expected, records, loaded),) = run_distributed(_worker, 1, prefix, plain, log, case)
    assert len(records) == STEPS
    for (main, heads, grad_norm), record in zip(expected, records):
        assert record["loss"] == pytest.approx(main, rel=1e-5)
        assert [record["mtp_1_loss"], record["mtp_2_loss"]] == pytest.approx(heads, rel=1e-5)
        assert record["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    if loaded is not None:
        assert all(loaded)


def test_parallel_layouts_train_alike(corpus, tmp_path):
    """TP 2 with sequence parallelism (the heads' projection gathered, their layer's input
    scattered) and DP 2 (the heads' sums over both ranks' tokens) give TP 1's steps; from a
    checkpoint with heads, so does PP 2 in two virtual stages each (the heads on the last stage
    beside a tied copy of the embedding), and its checkpoint resumes at PP 1 as PP 1's own."""
    prefix, _ = corpus
    mtp = ("--eod-mask-loss", "--mtp-num-layers", 2)
    ckpt, pp_ckpt = str(tmp_path / "ckpt"), str(tmp_path / "pp_ckpt")
    start = ("--load", ckpt, "--finetune")
    pp2 = ("--pipeline-model-parallel-size", 2, "--num-virtual-stages-per-pipeline-rank", 2)
    layouts = {
        "tp1": (1, ("--save", ckpt)),
        "tp2-sp": (2, ("--tensor-model-parallel-size", 2, "--sequence-parallel")),
        "dp2": (2, ()),
        "pp1": (1, start),
        "pp2-virtual": (2, (*start, *pp2, "--save", pp_ckpt, "--exit-interval", 2)),
        "pp2-to-pp1": (1, ("--load", pp_ckpt)),
    }
    runs = {}
    for name, (nproc, layout) in layouts.items():
        log = str(tmp_path / f"{name}.jsonl")
        run_pretrain(tiny_args(prefix, log, 3, *mtp, *layout), nproc=nproc)
        runs[name] = read_steps(log)
    pairs = [("tp1", "tp2-sp"), ("tp1", "dp2"), ("pp1", "pp2-virtual"), ("pp1", "pp2-to-pp1")]
    for reference, name in pairs:
        steps = {r["iteration"]: r for r in runs[reference]}
        for b in runs[name]:  # (by iteration: the PP 2 run stops at 2, its resumption runs 3)
            for key in ("loss", "mtp_1_loss", "mtp_2_loss", "grad_norm"):
                assert b[key] == pytest.approx(steps[b["iteration"]][key], rel=1e-5), (name, key)
    assert [r["iteration"] for r in runs["pp2-virtual"] + runs["pp2-to-pp1"]] == [1, 2, 3]
    assert runs["tp1"][-1]["mtp_2_loss"] < runs["tp1"][0]["mtp_2_loss"]


def _main_head_two_ways(rank, world, ckpt, tokens):
    """The main head's logits of ``ckpt`` as the runtime loads it (no heads built, theirs left
    in the checkpoint) and as the model with heads, loaded by the checkpoint loader, has them."""
    from megatron_slm.checkpoint import load_checkpoint, read_checkpoint
    from megatron_slm.models import ModelBuildOptions, build_model
    from megatron_slm.runtime import LoadArgs, load_model, plan_load

    loaded = load_model(plan_load(LoadArgs(load=ckpt, device="cpu")), torch.device("cpu"))
    assert not hasattr(loaded.chunks[0], "mtp") or loaded.chunks[0].mtp is None
    positions = torch.arange(tokens.shape[1])[None]
    with torch.no_grad():
        runtime = loaded.chunks[0](tokens, positions, None)  # [b, s, v]
        (full,) = build_model(read_checkpoint(ckpt).model, ModelBuildOptions(mtp_num_layers=2))
        load_checkpoint(ckpt, [full], weights_only=True)
        direct = _head_logits(full.eval(), tokens, positions)[0].transpose(0, 1)
    return runtime, direct


def test_checkpoints_resume_and_keep_their_heads(corpus, tmp_path, capsys):
    """Stopped at step 2 and resumed, the run's steps are a straight run's (the heads and their
    optimizer state are in the checkpoint); the runtime (scoring, evaluation, export) loads its
    main model without the heads; resuming with another head count is refused, and so is
    fine-tuning into another count."""
    from megatron_slm.training.config import parse_config
    from megatron_slm.training.loop import plan_training

    prefix, _ = corpus
    mtp = ("--mtp-num-layers", 2)
    straight, ckpt = str(tmp_path / "straight.jsonl"), str(tmp_path / "ckpt")
    run_pretrain(tiny_args(prefix, straight, 4, *mtp))
    resumed = str(tmp_path / "resumed.jsonl")
    run_pretrain(tiny_args(prefix, resumed, 4, *mtp, "--save", ckpt, "--exit-interval", 2))
    run_pretrain(tiny_args(prefix, resumed, 4, *mtp, "--load", ckpt, "--save", ckpt))
    for a, b in zip(read_steps(straight), read_steps(resumed), strict=True):
        assert b["mtp_2_loss"] == pytest.approx(a["mtp_2_loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)

    tokens = torch.randint(0, 500, (2, 32))
    ((runtime, direct),) = run_distributed(_main_head_two_ways, 1, ckpt, tokens)
    torch.testing.assert_close(runtime, direct, rtol=1e-5, atol=1e-5)

    def refused(*extra):
        argv = tiny_args(prefix, str(tmp_path / "x.jsonl"), 8, *extra)
        return refusal(lambda: plan_training(parse_config(list(map(str, argv))), 1), capsys)

    assert refused("--load", ckpt).startswith(
        f"no --mtp-num-layers: the checkpoint --load {ckpt}/iter_0000004 was trained with 2 heads"
    )
    assert refused("--load", ckpt, "--finetune", "--mtp-num-layers", 1).startswith(
        f"--mtp-num-layers 1: the checkpoint --load {ckpt}/iter_0000004 has 2 heads"
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--mtp-loss-scaling-factor", -1), "--mtp-loss-scaling-factor must be >= 0"),
    ],
)
def test_refusals_name_the_flag(corpus, tmp_path, capsys, extra, message):
    from megatron_slm.models.presets import get_preset
    from megatron_slm.training.config import parse_config, validate

    prefix, _ = corpus
    argv = tiny_args(prefix, str(tmp_path / "x.jsonl"), 4, "--mtp-num-layers", 1, *extra)

    def check():
        validate(parse_config(list(map(str, argv))), 2, get_preset("tiny"))

    assert refusal(check, capsys).split("error: ")[-1].startswith(message)


def _load_plain_into_heads(rank, world, plain, strict):
    """``plain`` (no heads) loaded into a model with one head under ``strict``: what happened,
    whether the heads kept their initialisation, and the warnings logged."""
    import logging

    from megatron_slm import launch
    from megatron_slm.checkpoint import load_checkpoint, read_checkpoint
    from megatron_slm.models import ModelBuildOptions, build_model

    launch.initialize(device="cpu")
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("megatron_slm").addHandler(handler)
    (model,) = build_model(read_checkpoint(plain).model, ModelBuildOptions(mtp_num_layers=1))
    heads = {k: v.clone() for k, v in model.state_dict().items()
             if k.startswith("mtp.") and torch.is_tensor(v)}  # fmt: skip
    try:
        load_checkpoint(plain, [model], weights_only=True, strict=strict)
    except BaseException as e:  # (torch's CheckpointException is not an Exception)
        return type(e).__name__, str(e)[:800], warnings
    kept = all(torch.equal(model.state_dict()[k], v) for k, v in heads.items())
    return "loaded", kept, warnings


def test_dist_ckpt_strictness_decides_what_a_checkpoint_may_lack(corpus, tmp_path):
    """--dist-ckpt-strictness (megatron-core's StrictHandling): by default a weight the
    checkpoint lacks fails the load; ignore_all loads the rest, the lacking weights keep their
    initialisation and are named in a warning; raise_unexpected refuses them in one line, and
    raise_all also a --finetune load that leaves the checkpoint's optimizer state unread."""
    _, plain = corpus
    (default,) = run_distributed(_load_plain_into_heads, 1, plain, "assume_ok_unexpected")
    assert default[0] == "CheckpointException"  # (torch's distributed checkpoint: a key error)
    ((outcome, kept, warnings),) = run_distributed(_load_plain_into_heads, 1, plain, "ignore_all")
    assert outcome == "loaded" and kept
    assert any("lacks 10 of the model's weights" in w and "mtp.layers.0.enorm.weight" in w
               for w in warnings), warnings  # fmt: skip
    ((kind, message, _),) = run_distributed(_load_plain_into_heads, 1, plain, "raise_unexpected")
    assert kind == "CheckpointError" and "lacks 10 of the model's weights: mtp.layers.0." in message
    proc = run_pretrain(
        tiny_args(corpus[0], str(tmp_path / "x.jsonl"), 3, "--load", plain, "--finetune",
                  "--dist-ckpt-strictness", "raise_all"),
        check=False,
    )  # fmt: skip
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Some keys found in the checkpoint are missing" in line, line
    assert "optimizer.state." in line and line.endswith("(--dist-ckpt-strictness raise_all)")
