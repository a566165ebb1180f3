"""Megatron-LM's training flags in the real ``Trainer``, each against what it must change.

Recompute (``--recompute-activations`` = selective core attention, as in Megatron-LM;
``--recompute-granularity full`` with ``--recompute-method uniform|block``; ``--recompute-modules
mlp``): the step's gradients are bitwise those without recompute, and the recomputed modules run
twice (forward hooks count them). ``--attention-dropout`` / ``--hidden-dropout``: the gradients
change, reproducibly for a seed, and evaluation does not drop. ``--manual-gc``: automatic
collection is off during the run and collections come at the asked steps and around evaluations.
``--no-load-optim`` / ``--no-load-rng``: the weights, step and data position resume, Adam starts
afresh (even from another optimizer layout), the learning rate is the loaded step's, and the random
states are the saved ones only without ``--no-load-rng``. Megatron-LM's Llama architecture flags
are accepted when they describe the model and refused in one line when they do not.
"""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch

from megatron_slm.errors import CheckpointError, ConfigError
from megatron_slm.models.args import ModelArgs
from megatron_slm.models.presets import GPT3_KIND, get_preset
from megatron_slm.training.config import parse_config, validate
from megatron_slm.training.optimizer import optimizer_layout
from tests.dist_helpers import run_distributed
from tests.functional.pretrain_helpers import (
    VOCAB,
    VOCAB_FLAG,
    close_trainer,
    cpu_trainer,
    make_null_corpus,
    read_steps,
    refusal,
    tiny_args,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_null_corpus(str(tmp_path_factory.mktemp("flags")), "c", [30] * 80)


SETTINGS = {
    "none": (),
    "selective": ("--recompute-activations",),
    "selective-mlp": ("--recompute-granularity", "selective", "--recompute-modules", "mlp"),
    "full": ("--recompute-granularity", "full"),
    "full-block-2": ("--recompute-granularity", "full", "--recompute-method", "block",
                     "--recompute-num-layers", 2),
    "dropout": ("--attention-dropout", 0.2, "--hidden-dropout", 0.2),
    "dropout-again": ("--attention-dropout", 0.2, "--hidden-dropout", 0.2),
}  # fmt: skip


def _recompute_worker(rank, world, prefix, log):
    out = {}
    for name, extra in SETTINGS.items():
        argv = tiny_args(prefix, log, 4, "--split", "90,10,0", "--eval-iters", 1,
                         "--eval-interval", 100, "--num-workers", 0, *extra)  # fmt: skip
        trainer = cpu_trainer(argv)
        chunk = trainer.chunks[0]
        counts = {"attention": 0, "mlp": 0}
        for layer in chunk.module.decoder.layers:
            for key, module in (("attention", layer.self_attention.core_attention),
                                ("mlp", layer.mlp)):  # fmt: skip
                module.register_forward_pre_hook(
                    lambda *_, key=key, counts=counts: counts.__setitem__(key, counts[key] + 1)
                )
        trainer.train_step()  # 4 micro-batches through 4 layers
        step_counts = dict(counts)  # (before the evaluation's forwards)
        grads = torch.cat([p.main_grad.flatten() for p in chunk.parameters()]).clone()
        valid = trainer.evaluate()[""]
        out[name] = {"counts": step_counts, "grads": grads, "valid": valid,
                     "granularity": chunk.config.recompute_granularity}  # fmt: skip
        close_trainer(trainer)
    return out


MOE_RECOMPUTE = {
    "none": (),
    "moe": ("--recompute-granularity", "selective", "--recompute-modules", "moe"),
    "moe_layer": ("--moe-layer-recompute",),  # (Megatron-LM's older flag: core_attn and moe)
    "shared_experts": ("--recompute-granularity", "selective", "--recompute-modules",
                       "shared_experts"),
    # accepted: the same experts, one by one, and the same routing (no TE kernels)
    "te_kernels": ("--moe-grouped-gemm", "--moe-permute-fusion", "--moe-router-fusion"),
    "alltoall": ("--moe-token-dispatcher-type", "alltoall"),
    "overlap": ("--moe-token-dispatcher-type", "alltoall", "--moe-shared-expert-overlap"),
}  # fmt: skip


def _moe_recompute_worker(rank, world, prefix, log):
    out = {}
    mixture = ("--num-experts", 4, "--moe-aux-loss-coeff", "1e-2", "--moe-layer-freq", "[1,0,1,1]",
               "--moe-shared-expert-intermediate-size", 32, "--num-workers", 0)  # fmt: skip
    for name, extra in MOE_RECOMPUTE.items():
        trainer = cpu_trainer(tiny_args(prefix, log, 4, *mixture, *extra))
        chunk = trainer.chunks[0]
        counts = {"router": 0, "shared": 0}
        for layer in chunk.module.decoder.layers:
            if hasattr(layer.mlp, "router"):
                for key, module in (("router", layer.mlp.router),
                                    ("shared", layer.mlp.shared_experts)):  # fmt: skip
                    module.register_forward_pre_hook(
                        lambda *_, key=key, counts=counts: counts.__setitem__(key, counts[key] + 1)
                    )
        trainer.train_step()  # 4 micro-batches through 3 mixtures
        grads = torch.cat([p.main_grad.flatten() for p in chunk.parameters()]).clone()
        experts = {type(layer.mlp.experts).__name__ for layer in chunk.module.decoder.layers
                   if hasattr(layer.mlp, "experts")}  # fmt: skip
        out[name] = {"counts": dict(counts), "grads": grads, "experts": experts}
        close_trainer(trainer)
    return out


def test_moe_recompute_replays_the_mixture(corpus, tmp_path):
    """--recompute-modules moe: each mixture (router, experts, shared expert) runs twice per
    micro-batch; shared_experts: the shared expert alone; the gradients are bitwise those
    without recompute. --moe-grouped-gemm, --moe-permute-fusion and --moe-router-fusion
    (accepted) run the same SequentialMLP experts and routing; the all-to-all dispatcher, with
    the shared expert overlapped with its exchange or not, gives the same gradients."""
    out = run_distributed(_moe_recompute_worker, 1, corpus, str(tmp_path / "log.jsonl"))[0]
    calls = 4 * 3  # micro-batches x mixtures
    expected = {"none": (calls, calls), "moe": (2 * calls, 2 * calls),
                "moe_layer": (2 * calls, 2 * calls),
                "shared_experts": (calls, 2 * calls), "te_kernels": (calls, calls),
                "alltoall": (calls, calls),
                # (the overlap runs the shared expert's parts around the exchange, not its forward)
                "overlap": (calls, 0)}  # fmt: skip
    for name, (router, shared) in expected.items():
        assert out[name]["counts"] == {"router": router, "shared": shared}, name
        if name == "overlap":  # (the shared expert's output joins in another order)
            torch.testing.assert_close(out[name]["grads"], out["none"]["grads"])
        else:
            assert torch.equal(out[name]["grads"], out["none"]["grads"]), name
        assert out[name]["experts"] == {"SequentialMLP"}, name


def _aux_gradient_worker(rank, world, prefix, log):
    """The gradient the auxiliary losses add (a step with them less one without), plain and at
    --slm-ratio 0.5: the same weights and micro-batches, so only they differ."""
    # (no clipping: it would scale the two steps' gradients apart)
    mixture = ("--num-experts", 4, "--moe-z-loss-coeff", "1e-2", "--num-workers", 0,
               "--clip-grad", 0)  # fmt: skip
    out = {}
    for name, slm in (("plain", ()), ("slm", ("--slm-ratio", 0.5, "--slm-select-mode", "loss"))):
        grads = []
        for aux in ("1e-1", "0"):
            extra = ("--moe-aux-loss-coeff", aux) + (
                () if aux != "0" else ("--moe-z-loss-coeff", 0)
            )
            trainer = cpu_trainer(tiny_args(prefix, log, 4, *mixture, *slm, *extra))
            trainer.train_step()
            chunk = trainer.chunks[0]
            grads.append(torch.cat([p.main_grad.flatten() for p in chunk.parameters()]).clone())
            close_trainer(trainer)
        out[name] = grads[0] - grads[1]
    return out


def test_auxiliary_losses_keep_their_weight_under_selection(corpus, tmp_path):
    """megatron-core normalises a mixture's auxiliary losses by the step's trained tokens: the
    selected half at --slm-ratio 0.5, where they would weigh twice their coefficient. Their
    gradient at ratio 0.5 is plain training's (the coefficients scaled by the ratio)."""
    out = run_distributed(_aux_gradient_worker, 1, corpus, str(tmp_path / "log.jsonl"))[0]
    plain, selective = out["plain"], out["slm"]
    assert plain.abs().max() > 0
    torch.testing.assert_close(selective, plain, rtol=1e-3, atol=1e-5 * plain.abs().max())


def test_recompute_changes_nothing_computed_and_dropout_only_training(corpus, tmp_path):
    out = run_distributed(_recompute_worker, 1, corpus, str(tmp_path / "log.jsonl"))[0]
    calls = 4 * 4  # micro-batches x layers
    expected = {
        "none": (None, calls, calls),
        "selective": ("selective", 2 * calls, calls),  # Megatron-LM's: core attention only
        "selective-mlp": ("selective", calls, 2 * calls),
        "full": ("full", 2 * calls, 2 * calls),
        "full-block-2": ("full", calls + calls // 2, calls + calls // 2),  # 2 layers of 4
    }
    base = out["none"]["grads"]
    assert base.abs().sum() > 0
    for name, (granularity, attention, mlp) in expected.items():
        got = out[name]
        assert got["granularity"] == granularity, name
        assert got["counts"] == {"attention": attention, "mlp": mlp}, name
        assert torch.equal(got["grads"], base), name  # recompute replays the same arithmetic
        assert got["valid"] == out["none"]["valid"], name
    dropped = out["dropout"]["grads"]
    assert (dropped - base).abs().max() > 1e-4 * base.abs().max()
    assert torch.equal(dropped, out["dropout-again"]["grads"])  # the seed decides the masks
    assert out["dropout"]["valid"] == out["none"]["valid"]  # evaluation never drops


def _gc_worker(rank, world, prefix, log):
    from megatron_slm import launch
    from megatron_slm.training.loop import plan_training, pretrain

    argv = tiny_args(prefix, log, 6, "--split", "90,10,0", "--eval-iters", 1,
                     "--eval-interval", 3, "--manual-gc", "--manual-gc-interval", 2,
                     "--num-workers", 0)  # fmt: skip
    cfg = parse_config([str(a) for a in argv])
    plan = plan_training(cfg, 1)
    device = launch.initialize(device="cpu", seed=cfg.training.seed)
    from megatron_slm.training import loop

    collections, finished = [], []  # (steps finished, automatic collection on?) per collection
    real_collect, real_advance = gc.collect, loop.Trainer.advance

    def collect(*args):
        collections.append((len(finished), gc.isenabled()))
        return real_collect(*args)

    def advance(self):
        result = real_advance(self)
        finished.append(self.iteration)
        return result

    gc.collect, loop.Trainer.advance = collect, advance
    try:
        enabled_before = gc.isenabled()
        pretrain(cfg, plan, device)
    finally:
        gc.collect, loop.Trainer.advance = real_collect, real_advance
    return enabled_before, gc.isenabled(), collections


def test_manual_gc_collects_at_the_asked_steps_only(corpus, tmp_path):
    before, after, collections = run_distributed(
        _gc_worker, 1, corpus, str(tmp_path / "log.jsonl")
    )[0]
    assert before and after  # automatic collection is back after the run
    # A collection inside step N sees N - 1 steps finished: the start (0); after steps 2, 4
    # and 6; before and after the evaluations of steps 3 and 6.
    assert [enabled for _, enabled in collections] == [False] * len(collections)
    assert [steps for steps, _ in collections] == [0, 1, 2, 2, 3, 5, 5, 5]


def _weights(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.chunks[0].parameters()]).clone()


def _adam_moments(trainer):
    from megatron_slm.optimizer_state import optimizer_parts

    total = 0.0
    for part in optimizer_parts(trainer.optimizer):
        for state in part.optimizer.state.values():
            total += float(state["exp_avg"].abs().sum()) if "exp_avg" in state else 0.0
    return total


def _no_load_worker(rank, world, prefix, log, save):
    from megatron_slm.checkpoint import load_rng_file

    common = tiny_args(prefix, log, 8, "--num-workers", 0)
    first = cpu_trainer([*common, "--save", save, "--use-distributed-optimizer"])
    for _ in range(4):
        first.advance()
    torch.rand(7)  # the run's generator moved on (as dropout would move it): a state to restore
    first.save()
    saved_weights, saved_lr = _weights(first), first.optimizer.param_groups[0]["lr"]
    close_trainer(first)
    saved_rng = load_rng_file(f"{save}/iter_0000004/rng/rank_00000.pt")["torch"]

    fresh = cpu_trainer([*common, "--load", save, "--no-load-optim", "--no-load-rng"])
    fresh_state = {
        "iteration": fresh.iteration,
        "consumed": fresh.batches.consumed_samples,
        "weights": torch.equal(_weights(fresh), saved_weights),
        "moments": _adam_moments(fresh),
        "lr": fresh.optimizer.param_groups[0]["lr"],
        "rng_is_saved": torch.equal(torch.get_rng_state(), saved_rng),
    }
    fresh.advance()  # trains from there with a new Adam
    fresh_state["moments_after"] = _adam_moments(fresh)
    close_trainer(fresh)

    full = cpu_trainer([*common, "--load", save, "--use-distributed-optimizer"])
    full_state = {
        "lr": full.optimizer.param_groups[0]["lr"],
        "moments": _adam_moments(full),
        "rng_is_saved": torch.equal(torch.get_rng_state(), saved_rng),
    }
    close_trainer(full)

    lean_dir = f"{save}-lean"
    lean = cpu_trainer([*common, "--save", lean_dir, "--no-save-optim", "--no-save-rng"])
    lean.advance()
    lean.save()
    close_trainer(lean)
    from megatron_slm.training.loop import plan_training

    with pytest.raises(ConfigError) as refused:
        plan_training(parse_config([str(a) for a in [*common, "--load", lean_dir]]), 1)
    resumed = cpu_trainer([*common, "--load", lean_dir, "--no-load-optim"])
    lean_state = {
        "files": sorted(os.listdir(f"{lean_dir}/iter_0000001")),
        "refused": str(refused.value),
        "iteration": resumed.iteration,
    }
    close_trainer(resumed)
    return saved_lr, fresh_state, full_state, lean_state


def test_no_load_optim_and_rng_resume_the_rest(corpus, tmp_path):
    """Saved with the distributed optimizer, resumed without it under --no-load-optim: a
    layout that could not restore Adam's state is fine when none is loaded. And checkpoints
    saved without optimizer and RNG states (--no-save-optim, --no-save-rng)."""
    saved_lr, fresh, full, lean = run_distributed(
        _no_load_worker, 1, corpus, str(tmp_path / "log.jsonl"), str(tmp_path / "ckpt")
    )[0]
    assert fresh["iteration"] == 4 and fresh["consumed"] == 4 * 8 and fresh["weights"]
    assert fresh["moments"] == 0.0 and fresh["moments_after"] > 0  # Adam afresh
    assert full["moments"] > 0  # (the state that --no-load-optim leaves behind)
    assert fresh["lr"] == full["lr"] == saved_lr  # the rate of the loaded step, not a warmup's
    assert full["rng_is_saved"] and not fresh["rng_is_saved"]
    # --no-save-optim --no-save-rng: a checkpoint of the weights and position only, which
    # resumes with --no-load-optim and is refused without it, in one line naming both flags
    assert "rng" not in lean["files"] and lean["iteration"] == 1
    assert lean["refused"].endswith(
        "it holds no optimizer state (saved with --no-save-optim, or written by a tool): "
        "resume with --no-load-optim (a fresh optimizer) or --finetune"
    )


def _group_rates(trainer):
    """{(max_lr, min_lr): (lr now, names of the group's parameters)} of the optimizer."""
    names = {id(p): n for n, p in trainer.chunks[0].module.named_parameters()}
    return {
        (g["max_lr"], g["min_lr"]): (g["lr"], sorted(names[id(p)] for p in g["params"]))
        for g in trainer.optimizer.param_groups
    }


def _decoupled_worker(rank, world, prefix, log, save):
    common = tiny_args(prefix, log, 8, "--num-workers", 0, "--decoupled-lr", 6e-3,
                       "--decoupled-min-lr", 1e-4)  # fmt: skip
    first = cpu_trainer([*common, "--save", save])
    rates = []
    for _ in range(3):
        first.advance()
        rates.append(_group_rates(first))
    first.save()
    close_trainer(first)
    resumed = cpu_trainer([*common, "--load", save])
    for _ in range(5):
        resumed.advance()
        rates.append(_group_rates(resumed))
    logged = [r["lr"] for r in read_steps(log)]
    close_trainer(resumed)
    return rates, logged


def test_decoupled_lr_schedules_the_embedding_and_output_layer_apart(corpus, tmp_path):
    """--decoupled-lr / --decoupled-min-lr: the input embedding and the output layer follow
    megatron-core's scheduler with their own bounds, the other weights --lr's, through a
    resume; the log shows --lr's rate."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    rates, logged = run_distributed(
        _decoupled_worker, 1, corpus, str(tmp_path / "log.jsonl"), str(tmp_path / "ckpt")
    )[0]
    p = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    ref_opt = torch.optim.AdamW([{"params": [p[0]], "max_lr": 3e-3, "min_lr": 0.0},
                                 {"params": [p[1]], "max_lr": 6e-3, "min_lr": 1e-4}])  # fmt: skip
    reference = OptimizerParamScheduler(
        ref_opt, init_lr=0.0, max_lr=3e-3, min_lr=0.0, lr_warmup_steps=2, lr_decay_steps=8,
        lr_decay_style="cosine", start_wd=0.1, end_wd=0.1, wd_incr_steps=8,
        wd_incr_style="constant",
    )  # fmt: skip
    decoupled = ["embedding.word_embeddings.weight", "output_layer.weight"]
    for step, groups in enumerate(rates):
        reference.step(increment=1)
        plain_lr, decoupled_lr = (g["lr"] for g in ref_opt.param_groups)
        for (max_lr, min_lr), (lr, names) in groups.items():
            if max_lr == 6e-3:
                assert (min_lr, names) == (1e-4, decoupled), step
                assert lr == pytest.approx(decoupled_lr, rel=1e-12), step
            else:
                assert (max_lr, min_lr) == (3e-3, 0.0) and not set(names) & set(decoupled)
                assert lr == pytest.approx(plain_lr, rel=1e-12), step
        assert logged[step] == pytest.approx(plain_lr, rel=1e-12)
    assert len(rates) == 8 and 6e-3 in {k[0] for k in rates[-1]}  # (after the resume too)


def _weight_decay_worker(rank, world, prefix, log):
    decay = {}
    cond = ("--no-weight-decay-cond-type", "apply_wd_to_qk_layernorm")  # (its newer form)
    variants = (("default", ()), ("qk", ("--apply-wd-to-qk-layernorm",)), ("cond", cond))
    for name, extra in variants:
        trainer = cpu_trainer(tiny_args(prefix, log, 4, "--num-workers", 0, "--qk-layernorm",
                                        "--weight-decay", 0.1, *extra))  # fmt: skip
        names = {id(p): n for n, p in trainer.chunks[0].module.named_parameters()}
        decay[name] = {names[id(p)]: g["wd_mult"] * g["weight_decay"]
                       for g in trainer.optimizer.param_groups for p in g["params"]}  # fmt: skip
        close_trainer(trainer)
    return decay


def test_weight_decay_spares_norms_and_biases_unless_qk_norms_are_asked(corpus, tmp_path):
    """Megatron-LM's rule: every matrix decays, no norm weight or bias does;
    --apply-wd-to-qk-layernorm (or --no-weight-decay-cond-type apply_wd_to_qk_layernorm, its newer
    form) decays the QK norms' weights as well."""
    (decay,) = run_distributed(_weight_decay_worker, 1, corpus, str(tmp_path / "log.jsonl"))
    qk = [n for n in decay["default"] if "q_layernorm" in n or "k_layernorm" in n]
    assert len(qk) == 2 * get_preset("tiny").num_layers
    for name, rate in decay["default"].items():
        is_vector = "norm" in name or name.endswith(".bias")
        assert rate == (0.0 if is_vector else pytest.approx(0.1)), name
        assert decay["qk"][name] == (pytest.approx(0.1) if name in qk else rate), name
    assert decay["cond"] == decay["qk"]


def _mock_worker(rank, world, log, cache):
    from megatron_slm.training.data import MicroBatches

    argv = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB_FLAG,
            "--model-preset", "tiny", "--seq-length", 64, "--micro-batch-size", 2,
            "--global-batch-size", 4, "--train-iters", 3, "--eval-interval", 3, "--eval-iters", 1,
            "--num-workers", 0, "--data-cache-path", cache, "--log-loss-file", log]  # fmt: skip
    trainer = cpu_trainer(argv)
    rows = torch.cat([b["tokens"] for b, _ in zip(MicroBatches(trainer.train_ds, 2, 0), range(4))])
    eod = trainer.tokenizer.eod
    for _ in range(3):
        trainer.advance()
    losses = [r["loss"] for r in read_steps(log)]
    valid = trainer.evaluate()[""]
    close_trainer(trainer)
    return rows, eod, losses, valid


def test_mock_data_is_megatron_lms_counting_documents(tmp_path):
    """--mock-data trains and validates on megatron-core's synthetic documents: each counts
    1, 2, 3, ... and ends with the end-of-document token, after which the next starts at 1."""
    rows, eod, losses, valid = run_distributed(
        _mock_worker, 1, str(tmp_path / "log.jsonl"), str(tmp_path / "cache")
    )[0]
    assert rows.shape == (8, 64)
    a, b = rows[:, :-1], rows[:, 1:]
    follows = (b == (a + 1) % VOCAB) | (b == eod) | ((a == eod) & (b == 1))
    assert bool(follows.all())
    assert int((rows == eod).sum()) > 0 and len(set(rows[:, 0].tolist())) > 1  # several documents
    assert len(losses) == 3 and all(0 < x < 10 for x in [*losses, valid])


def test_a_null_tokenizer_is_megatron_lms():
    """Megatron-LM's mock-data benchmarks (``--tokenizer-type NullTokenizer --vocab-size
    128256``) build its vocabulary: megatron-core's NullTokenizer's ids (the EOD after them),
    padded as Megatron-LM pads them."""
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    from megatron_slm.models import padded_vocab_size
    from megatron_slm.training.loop import plan_training

    argv = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128256",
            "--model-preset", "tiny", "--train-iters", "4", "--global-batch-size", "8",
            "--micro-batch-size", "1", "--tensor-model-parallel-size", "2"]  # fmt: skip
    plan = plan_training(parse_config(argv), 2)
    ref = NullTokenizer(128256)
    assert (plan.tokenizer.eod, plan.arch.vocab_size) == (ref.eod, ref.vocab_size)
    megatron_lms = math.ceil(ref.vocab_size / (128 * 2)) * 128 * 2  # _vocab_size_with_padding
    assert padded_vocab_size(plan.arch.vocab_size, 128, 2) == megatron_lms == 128512
    assert plan.tokenizer_record["vocab_size"] == 128257  # the ids in all, as for every type


@pytest.mark.parametrize(
    "layers, pp, embedding, loss",
    [(3, 2, True, False), (5, 3, False, True), (6, 4, True, True), (7, 3, True, True),
     (8, 3, True, False)],
)  # fmt: skip
def test_accounting_for_embedding_and_loss_splits_as_megatron_core(layers, pp, embedding, loss):
    """--account-for-embedding/loss-in-pipeline-split: each stage's layers, and so its first
    layer, as megatron-core builds them from those fields (``get_num_layers_to_build``,
    ``get_transformer_layer_offset``)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_slm.models.presets import pipeline_stage_layers

    flags = [f"--account-for-{part}-in-pipeline-split"
             for part, on in (("embedding", embedding), ("loss", loss)) if on]  # fmt: skip
    argv = ["--data-path", "A", "--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB_FLAG,
            "--train-iters", 4, "--model-preset", "tiny", "--num-layers", layers,
            "--pipeline-model-parallel-size", pp, *flags]  # fmt: skip
    cfg = parse_config([str(a) for a in argv])
    stages = pipeline_stage_layers(layers, pp, *cfg.parallel.stage_split(layers))
    config = TransformerConfig(
        num_layers=layers, hidden_size=8, num_attention_heads=2, pipeline_model_parallel_size=pp,
        account_for_embedding_in_pipeline_split=embedding,
        account_for_loss_in_pipeline_split=loss, pipeline_dtype=torch.float32,
    )  # fmt: skip
    assert list(stages) == [get_num_layers_to_build(config, pp_rank=r) for r in range(pp)]
    offsets = [get_transformer_layer_offset(config, pp_rank=r) for r in range(pp)]
    assert offsets == [sum(stages[:r]) for r in range(pp)]
    validate(cfg, pp, cfg.model.architecture(VOCAB))  # the trainer's checks take it
    layout = optimizer_layout(cfg, 1, layers)  # what a resume compares: the split itself
    assert layout["decoder_first_pipeline_num_layers"] == (stages[0] if embedding else None)
    assert layout["decoder_last_pipeline_num_layers"] == (stages[-1] if loss else None)


def test_accounting_that_does_not_split_evenly_is_one_line():
    argv = ["--data-path", "A", "--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB_FLAG,
            "--train-iters", 4, "--model-preset", "tiny", "--pipeline-model-parallel-size", 2,
            "--account-for-embedding-in-pipeline-split"]  # fmt: skip
    cfg = parse_config([str(a) for a in argv])
    with pytest.raises(ConfigError) as refused:
        validate(cfg, 2, cfg.model.architecture(VOCAB))
    assert str(refused.value) == (
        "--num-layers 4 with --account-for-embedding-in-pipeline-split counts 5 layers: "
        "--pipeline-model-parallel-size 2 must split them evenly, at least two per stage (a "
        "stage of only the embedding or the loss is not built here)"
    )


def _padded_vocab_worker(rank, world, prefix, log, save):
    from megatron_slm.runtime import LoadArgs, plan_load

    trainer = cpu_trainer(tiny_args(prefix, log, 3, "--padded-vocab-size", 600, "--save", save,
                                    "--save-interval", 1, "--num-workers", 0))  # fmt: skip
    model = trainer.chunks[0].module
    rows = (model.embedding.word_embeddings.weight.shape[0], model.output_layer.weight.shape[0])
    trainer.advance()
    trainer.save()
    close_trainer(trainer)
    plan = plan_load(LoadArgs(load=save, device="cpu"))
    with pytest.raises(CheckpointError) as refused:  # a tool's flags only confirm the checkpoint
        plan_load(LoadArgs(load=save, device="cpu"), model_args=ModelArgs(padded_vocab_size=512))
    return rows, plan.checkpoint.padded_vocab_size, str(refused.value)


def test_padded_vocab_size_sets_the_models_rows(corpus, tmp_path, capsys):
    """--padded-vocab-size (Megatron-LM's flag): the embedding and output layer have exactly
    those rows, the checkpoint records them, a tool's flag that differs is one line; too few
    rows, or rows TP does not split, are refused before any work."""
    from megatron_slm.training.loop import plan_training

    save = str(tmp_path / "ckpt")
    ((rows, recorded, refused),) = run_distributed(
        _padded_vocab_worker, 1, corpus, str(tmp_path / "log.jsonl"), save
    )
    assert rows == (600, 600) and recorded == 600
    assert refused == f"--padded-vocab-size 512: --load {save} has 600 vocabulary rows"
    for rows, tp in ((500, 1), (601, 2)):
        argv = tiny_args(corpus, str(tmp_path / "x.jsonl"), 3, "--padded-vocab-size", rows,
                         "--tensor-model-parallel-size", tp)  # fmt: skip
        argv = [str(a) for a in argv]
        line = refusal(lambda argv=argv, tp=tp: plan_training(parse_config(argv), tp), capsys)
        assert line == (
            f"--padded-vocab-size {rows} must be at least the tokenizer's {VOCAB} ids and a "
            f"multiple of --tensor-model-parallel-size {tp}"
        )


def _config(*argv, data=("--data-path", "A")):
    base = (
        *data,
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        VOCAB_FLAG,
        "--train-iters",
        4,
    )
    cfg = parse_config([str(a) for a in (*base, *argv)])
    return cfg, validate(cfg, 1, cfg.model.architecture(VOCAB))


LLAMA_FLAGS = ("--use-mcore-models", "--group-query-attention", "--num-query-groups", 2,
               "--kv-channels", 16, "--position-embedding-type", "rope", "--rotary-percent", 1.0,
               "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
               "--normalization", "RMSNorm", "--attention-dropout", 0.0, "--hidden-dropout", 0.0,
               "--calculate-per-token-loss", "--cross-entropy-loss-fusion", "--log-throughput",
               "--no-create-attention-mask-in-dataloader", "--ckpt-format", "torch_dist",
               "--context-parallel-size", 1, "--accumulate-allreduce-grads-in-fp32",
               "--no-position-embedding", "--use-flash-attn", "--no-masked-softmax-fusion",
               "--no-rope-fusion", "--no-gradient-accumulation-fusion", "--optimizer", "adam",
               "--dataloader-type", "single", "--no-async-tensor-model-parallel-allreduce",
               "--use-checkpoint-args", "--distributed-backend", "gloo",
               "--use-rotary-position-embeddings", "--no-bias-swiglu-fusion",
               "--no-bias-dropout-fusion", "--expert-tensor-parallel-size", 1,
               "--auto-detect-ckpt-format")  # fmt: skip


def test_megatron_lms_llama_flags_describe_the_model_they_build():
    """The tiny preset's architecture with Megatron-LM's flags for it is the same architecture;
    --init-method-std and --rotary-base set the model's values."""
    plain, _ = _config()
    cfg, _ = _config(*LLAMA_FLAGS)
    assert cfg.model.architecture(VOCAB) == plain.model.architecture(VOCAB)
    set_values, _ = _config("--init-method-std", 0.0134, "--rotary-base", 1e6)
    arch = set_values.model.architecture(VOCAB)
    assert (arch.init_method_std, arch.rotary_base) == (0.0134, 1e6)
    assert arch.rope_scaling_factor is None
    llama31, _ = _config("--use-rope-scaling")  # (Megatron-LM's default factor)
    assert llama31.model.architecture(VOCAB).rope_scaling_factor == 8.0
    llama32, _ = _config("--use-rope-scaling", "--rope-scaling-factor", 32)
    assert llama32.model.architecture(VOCAB).rope_scaling_factor == 32.0
    assert ModelArgs(attention_backend="local").spec_impl == "local"
    assert ModelArgs(transformer_impl="transformer_engine").spec_impl == "te"  # Megatron-LM's
    assert ModelArgs().spec_impl is None


# Megatron-LM's Qwen3-30B-A3B (examples/post_training/modelopt/conf/Qwen/Qwen3-30B-A3B.sh; its
# norms' epsilon given, which that file leaves at Megatron-LM's 1e-5), and the Hugging Face
# config.json of the same model.
QWEN3_30B_A3B_FLAGS = (
    "--bf16", "--no-masked-softmax-fusion", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--position-embedding-type", "rope",
    "--no-rope-fusion", "--normalization", "RMSNorm", "--swiglu", "--num-layers", 48,
    "--hidden-size", 2048, "--ffn-hidden-size", 6144, "--num-attention-heads", 32,
    "--group-query-attention", "--num-query-groups", 4, "--kv-channels", 128, "--qk-layernorm",
    "--num-experts", 128, "--moe-ffn-hidden-size", 768, "--moe-router-topk", 8,
    "--moe-router-dtype", "fp32", "--moe-aux-loss-coeff", 1e-3,
    "--moe-router-load-balancing-type", "aux_loss", "--seq-length", 4096,
    "--max-position-embeddings", 40960, "--use-mcore-models", "--rotary-percent", 1.0,
    "--rotary-base", 1000000, "--no-bias-swiglu-fusion", "--norm-epsilon", 1e-6,
)  # fmt: skip
QWEN3_30B_A3B_HF = dict(
    architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
    moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, vocab_size=151936,
    max_position_embeddings=40960, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    hidden_act="silu", attention_bias=False,
)  # fmt: skip


def test_megatron_lms_qwen3_moe_flags_are_the_hugging_face_model():
    """Megatron-LM's flags for Qwen3-30B-A3B build the architecture its Hugging Face config
    imports as (30.5B parameters, as published), and --moe-router-dtype reaches the config."""
    from megatron_slm.runtime.hf_source import gpt_config_from_hf

    data = ["--data-path", "A", "--tokenizer-type", "NullTokenizer", "--train-iters", "4"]
    cfg = parse_config([*data, "--vocab-size", "151936", *map(str, QWEN3_30B_A3B_FLAGS)])
    ours = cfg.model.architecture(151936)
    assert ours == gpt_config_from_hf(QWEN3_30B_A3B_HF)
    assert ours.num_parameters() == 30_532_122_624
    assert cfg.training.moe["moe_router_dtype"] == "fp32"
    capacity = parse_config([*data, "--num-experts", "4", "--moe-expert-capacity-factor", "1.25",
                             "--moe-token-drop-policy", "position"]).training.moe  # fmt: skip
    assert (capacity["moe_expert_capacity_factor"], capacity["moe_token_drop_policy"]) == (
        1.25,
        "position",
    )


def _router_logits_dtype(rank, world):
    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset

    dev = launch.initialize(device="cpu")
    arch = get_preset("tiny").replace(num_experts=4)
    options = ModelBuildOptions(transformer_impl="torch", moe={"moe_router_dtype": "fp64"})
    (model,) = build_model(arch, options, dev)
    router = model.decoder.layers[0].mlp.router
    return router.gating(torch.randn(3, 2, arch.hidden_size)).dtype


def test_moe_router_dtype_is_the_routers():
    ((dtype,),) = [run_distributed(_router_logits_dtype, 1)]
    assert dtype == torch.float64


def test_logging_level_sets_every_logger(monkeypatch):
    """--logging-level (else MEGATRON_LOGGING_LEVEL) is every logger's level, megatron-core's
    (which the trainer otherwise quiets to WARNING) included; a bad variable is one line."""
    import logging

    from megatron_slm.pretrain import set_logging_level

    saved = {name: logging.getLogger(name).level for name in ("", "megatron.core")}
    monkeypatch.delenv("MEGATRON_LOGGING_LEVEL", raising=False)
    try:
        logging.getLogger("megatron.core").setLevel(logging.WARNING)
        set_logging_level(None)
        assert logging.getLogger("megatron.core").level == logging.WARNING
        cfg, _ = _config("--logging-level", 10)
        set_logging_level(cfg.logging.logging_level)
        assert logging.getLogger("megatron.core").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("megatron_slm.anything").isEnabledFor(logging.DEBUG)
        monkeypatch.setenv("MEGATRON_LOGGING_LEVEL", "30")
        set_logging_level(None)
        assert not logging.getLogger("megatron_slm").isEnabledFor(logging.INFO)
        monkeypatch.setenv("MEGATRON_LOGGING_LEVEL", "loud")
        with pytest.raises(ConfigError, match="MEGATRON_LOGGING_LEVEL='loud': not a logging"):
            set_logging_level(None)
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _megatron_swiglu_width(h: int) -> int:
    """Megatron-LM's validate_args with --swiglu: int((4 * h * 2 / 3) / 64) * 64."""
    return int((4 * h * 2 / 3) / 64) * 64


def test_a_megatron_lm_scripts_shape_gets_megatron_lms_defaults():
    """No preset and the whole shape (a GPT-3 script's GPT_MODEL_ARGS): Megatron-LM's defaults,
    not the tiny preset's: GPT-3's architecture with an FFN of 4h, each architecture flag
    changing its one choice (--swiglu also the FFN width, to Megatron-LM's). A preset, or fewer
    shape flags, keep the preset's values; a preset's choices follow the flags that name them."""
    shape = dict(num_layers=3, hidden_size=320, num_attention_heads=4, max_position_embeddings=64)
    arch = ModelArgs(**shape).architecture(VOCAB)
    assert (arch.num_layers, arch.hidden_size, arch.num_attention_heads) == (3, 320, 4)
    assert arch.kind == GPT3_KIND and arch.kind_name() == "GPT-3"
    assert arch.ffn_hidden_size == 4 * 320  # not tiny's 176
    assert arch.num_query_groups == 4  # MHA: tiny has 2 groups
    assert (arch.rotary_base, arch.norm_epsilon, arch.init_method_std) == (10000.0, 1e-5, 0.02)
    assert (arch.max_position_embeddings, arch.vocab_size) == (64, VOCAB)
    assert ModelArgs(**shape, group_query_attention=True).architecture(VOCAB).num_query_groups == 1
    one_choice = {
        "swiglu": (True, "activation", "swiglu"),
        "openai_gelu": (True, "activation", "openai_gelu"),
        "squared_relu": (True, "activation", "squared_relu"),
        "normalization": ("RMSNorm", "normalization", "RMSNorm"),
        "position_embedding_type": ("rope", "position_embedding_type", "rope"),
        "use_rotary_position_embeddings": (True, "position_embedding_type", "rope"),
        "disable_bias_linear": (True, "add_bias_linear", False),
        "untie_embeddings_and_output_weights": (True, "tied_embeddings", False),
        "qk_layernorm": (True, "qk_layernorm", True),
        "add_qkv_bias": (True, "add_qkv_bias", True),
        "apply_layernorm_1p": (True, "apply_layernorm_1p", True),
        "rotary_percent": (1.0, "rotary_percent", 1.0),
    }
    for flag, (value, name, chosen) in one_choice.items():
        changed = ModelArgs(**shape, **{flag: value}).architecture(VOCAB)
        assert changed.kind == {**GPT3_KIND, name: chosen}, flag
    assert ModelArgs(**shape, swiglu=True).architecture(VOCAB).ffn_hidden_size == (
        _megatron_swiglu_width(320)
    )
    nemotron_flags = dict(
        apply_layernorm_1p=True,
        squared_relu=True,
        position_embedding_type="rope",
        rotary_percent=0.5,
        disable_bias_linear=True,
        untie_embeddings_and_output_weights=True,
    )  # fmt: skip  (Megatron-LM's Nemotron-style GPT script's architecture flags)
    nemotron = ModelArgs(**shape, **nemotron_flags).architecture(VOCAB)
    assert nemotron.kind_name() == "Nemotron" and nemotron.ffn_hidden_size == 4 * 320
    squared = ModelArgs(**shape, squared_relu=True).architecture(VOCAB)
    assert squared.ffn_hidden_size == 4 * 320 and squared.kind_name() == "custom"
    assert ModelArgs(**shape, openai_gelu=True).architecture(VOCAB).kind_name() == "GPT-2"
    llama_flags = dict(
        swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
        disable_bias_linear=True, untie_embeddings_and_output_weights=True,
    )  # fmt: skip
    llama = ModelArgs(**shape, **llama_flags).architecture(VOCAB)
    assert llama.is_llama and llama.ffn_hidden_size == 832 and llama.kind_name() == "Llama"
    given = ModelArgs(**shape, ffn_hidden_size=100, num_query_groups=1, rotary_base=5e5)
    assert given.architecture(VOCAB).replace(ffn_hidden_size=1280, num_query_groups=4) == (
        arch.replace(rotary_base=5e5)
    )
    # A preset, or a partial shape, is the preset plus overrides.
    tiny = ModelArgs(model_preset="tiny", **shape).architecture(VOCAB)
    assert (tiny.ffn_hidden_size, tiny.num_query_groups) == (176, 2) and tiny.is_llama
    assert ModelArgs(num_layers=2).architecture(VOCAB).ffn_hidden_size == 176
    # --kv-channels: heads that do not split the width (recorded only where they do not)
    wide = ModelArgs(model_preset="tiny", kv_channels=32).architecture(VOCAB)
    assert (wide.head_dim, wide.kv_channels, tiny.kv_channels) == (32, 32, None)
    assert ModelArgs(model_preset="tiny", kv_channels=16).architecture(VOCAB).kv_channels is None
    stretched = ModelArgs(model_preset="tiny", rotary_seq_len_interpolation_factor=4)
    assert stretched.architecture(VOCAB) == get_preset("tiny").replace(
        vocab_size=VOCAB, rope_interpolation_factor=4.0
    )
    windowed = ModelArgs(model_preset="tiny", window_size="4095,0").architecture(VOCAB)
    assert windowed == get_preset("tiny").replace(vocab_size=VOCAB, window_size=4095)
    unbounded = ModelArgs(model_preset="tiny", window_size="-1,0").architecture(VOCAB)
    assert unbounded.window_size is None  # Megatron-LM's -1: an infinite window
    layer_norm = ModelArgs(model_preset="tiny", normalization="LayerNorm").architecture(VOCAB)
    assert layer_norm == get_preset("tiny").replace(vocab_size=VOCAB, normalization="LayerNorm")
    assert layer_norm.kind_name() == "custom"
    with pytest.raises(ConfigError, match="--max-position-embeddings is required"):
        ModelArgs(num_layers=2, hidden_size=64, num_attention_heads=4).architecture(VOCAB)
    with pytest.raises(ConfigError, match="give --ffn-hidden-size"):
        ModelArgs(**{**shape, "hidden_size": 20, "swiglu": True}).architecture(VOCAB)


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--normalization", "L2Norm"), "invalid choice"),
        (("--position-embedding-type", "learned_absolute", "--use-rotary-position-embeddings"),
         "--use-rotary-position-embeddings contradicts --position-embedding-type"),
        (("--position-embedding-type", "learned_absolute", "--no-position-embedding"),
         "give --position-embedding-type rope"),
        (("--position-embedding-type", "learned_absolute", "--use-rope-scaling"),
         "--use-rope-scaling needs --position-embedding-type rope"),
        (("--position-embedding-type", "learned_absolute", "--seq-length", 512),
         "--seq-length 512 exceeds --max-position-embeddings 256"),
        (("--rotary-percent", 0.3), "--rotary-percent 0.3 must be in (0, 1] and rotate an even "
                                     "number of each head's 16 channels"),
        (("--rotary-percent", 1.5), "--rotary-percent 1.5 must be in (0, 1]"),
        (("--rotary-percent", 0.5, "--position-embedding-type", "learned_absolute"),
         "--rotary-percent 0.5 applies to --position-embedding-type rope"),
        (("--apply-layernorm-1p", "--transformer-impl", "local"),
         "local norms without Apex have no zero-centred weights"),
        (("--initial-loss-scale", 1024),
         "--initial-loss-scale sets fp16's loss scaling: add --fp16"),
        (("--fp16", "--loss-scale", 8, "--hysteresis", 1),
         "--loss-scale is constant: --hysteresis sets the dynamic scale"),
        (("--rotary-seq-len-interpolation-factor", 0),
         "--rotary-seq-len-interpolation-factor must be positive"),
        (("--position-embedding-type", "learned_absolute", "--rotary-seq-len-interpolation-factor",
          2), "with --position-embedding-type rope (got 2 with learned_absolute)"),
        (("--decoder-first-pipeline-num-layers", 1),
         "--decoder-first-pipeline-num-layers needs --pipeline-model-parallel-size > 1"),
        (("--swiglu", "--squared-relu"), "--swiglu and --squared-relu are exclusive"),
        (("--openai-gelu", "--squared-relu"), "--openai-gelu and --squared-relu are exclusive"),
        (("--kv-channels", 0), "--kv-channels must be positive"),
        (("--init-method-xavier-uniform", "--init-method-std", 0.01), "give one of them"),
        (("--window-size", "8,8"), "--window-size 8,8: RIGHT must be 0 (causal attention)"),
        (("--window-size", "8"), "--window-size '8': give LEFT,RIGHT"),
        (("--window-size", "0,0"), "LEFT must be >= 1"),
        (("--attention-backend", "local", "--transformer-impl", "te"), "contradicts"),
        (("--attention-dropout", 1.0), "--attention-dropout must be in [0, 1)"),
        (("--rope-scaling-factor", 32), "--rope-scaling-factor needs --use-rope-scaling"),
        (("--context-parallel-size", 2), "context parallelism is not supported"),
        (("--moe-router-topk", 1), "--moe-router-topk needs --num-experts"),
        (("--moe-aux-loss-coeff", 0.01), "--moe-aux-loss-coeff needs --num-experts"),
        (("--num-experts", 1), "a mixture needs >= 2 experts"),
        (("--num-experts", 4, "--moe-router-topk", 5),
         "--moe-router-topk 5 must be in 1..--num-experts 4"),
        (("--expert-model-parallel-size", 2), "--expert-model-parallel-size needs --num-experts"),
        (("--num-experts", 4, "--expert-model-parallel-size", 3),
         "--expert-model-parallel-size 3 does not divide --num-experts 4"),
        (("--num-experts", 4, "--expert-model-parallel-size", 2),
         "--expert-model-parallel-size 2 does not divide the data-parallel size 1"),
        (("--moe-layer-freq", 2), "--moe-layer-freq needs --num-experts"),
        (("--account-for-loss-in-pipeline-split",),
         "--account-for-loss-in-pipeline-split needs --pipeline-model-parallel-size > 1"),
        (("--account-for-embedding-in-pipeline-split", "--pipeline-model-parallel-size", 2,
          "--decoder-last-pipeline-num-layers", 1), "give it or --decoder-first/last-pipeline"),
        (("--account-for-embedding-in-pipeline-split", "--pipeline-model-parallel-size", 2,
          "--num-virtual-stages-per-pipeline-rank", 2), "is not offered with virtual pipeline"),
        (("--ddp-average-in-collective",), "--ddp-average-in-collective is not offered: "
                                           "megatron-slm's loss is a sum over tokens"),
        (("--moe-layer-recompute", "--recompute-granularity", "full"),
         "--moe-layer-recompute is selective recompute: it contradicts"),
        (("--rerun-mode", "validate_results"),
         "--rerun-mode validate_results: Megatron-LM's rerun state machine is not offered"),
        (("--moe-shared-expert-gate",), "--moe-shared-expert-gate needs --num-experts"),
        (("--num-experts", 4, "--moe-layer-freq", "[1,0]"),
         "--moe-layer-freq [1, 0]: one 0 (dense) or 1 (mixture of experts) per layer, 4 in all"),
        (("--num-experts", 4, "--moe-layer-freq", "[0]*4"), "at least one 1"),
        (("--num-experts", 4, "--moe-layer-freq", "__import__('os')"),
         "--moe-layer-freq \"__import__('os')\": give N or a pattern of 0s and 1s"),
        (("--num-experts", 4, "--moe-layer-freq", "0"), "--moe-layer-freq 0 must be >= 1"),
        (("--num-experts", 4, "--moe-shared-expert-gate"),
         "--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size"),
        (("--num-experts", 4, "--moe-shared-expert-intermediate-size", 0),
         "--moe-shared-expert-intermediate-size must be positive"),
        (("--moe-router-score-function", "sigmoid"),
         "--moe-router-score-function needs --num-experts"),
        (("--num-experts", 4, "--moe-router-enable-expert-bias"),
         "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid"),
        (("--num-experts", 4, "--moe-router-bias-update-rate", 0.1),
         "--moe-router-bias-update-rate needs --moe-router-enable-expert-bias"),
        (("--num-experts", 4, "--moe-router-score-function", "sigmoid",
          "--moe-router-pre-softmax"), "--moe-router-pre-softmax applies to the softmax"),
        (("--num-experts", 4, "--moe-router-topk", 1),
         "--moe-router-topk 1 needs --moe-router-pre-softmax"),
        (("--num-experts", 4, "--moe-router-num-groups", 2), "go together"),
        (("--num-experts", 4, "--moe-router-num-groups", 3, "--moe-router-group-topk", 1),
         "--moe-router-num-groups 3 must divide --num-experts 4"),
        (("--moe-router-dtype", "fp32"), "--moe-router-dtype needs --num-experts"),
        (("--moe-per-layer-logging",), "--moe-per-layer-logging needs --num-experts"),
        (("--moe-expert-capacity-factor", 1.0), "--moe-expert-capacity-factor needs --num-experts"),
        (("--num-experts", 4, "--moe-expert-capacity-factor", 0),
         "--moe-expert-capacity-factor must be positive"),
        (("--num-experts", 4, "--moe-token-drop-policy", "position"),
         "--moe-token-drop-policy needs --moe-expert-capacity-factor"),
        (("--num-experts", 4, "--moe-expert-capacity-factor", 1.0,
          "--moe-pad-expert-input-to-capacity"),
         "--moe-pad-expert-input-to-capacity needs --moe-token-dispatcher-type alltoall"),
        (("--num-experts", 4, "--moe-router-topk-scaling-factor", 0),
         "--moe-router-topk-scaling-factor must be positive"),
        (("--num-layers", 2, "--hidden-size", 64, "--num-attention-heads", 4,
          "--max-position-embeddings", 64, "--num-experts", 4),
         "--num-experts 4 needs --disable-bias-linear"),
        (("--num-experts", 4, "--tensor-model-parallel-size", 2),
         "--tensor-model-parallel-size 2 needs --sequence-parallel (megatron-core's rule)"),
        (("--num-experts", 4, "--moe-token-dispatcher-type", "flex"), "invalid choice"),
        (("--recompute-activations", "--recompute-granularity", "full"), "is selective"),
        (("--recompute-method", "block"), "applies to --recompute-granularity full"),
        (("--recompute-modules", "mlp"), "applies to selective recompute"),
        (("--recompute-granularity", "selective", "--recompute-modules", "moe"),
         "--recompute-modules moe needs --num-experts"),
        (("--num-experts", 4, "--recompute-granularity", "selective", "--recompute-modules",
          "shared_experts"),
         "--recompute-modules shared_experts needs --moe-shared-expert-intermediate-size"),
        (("--recompute-granularity", "selective", "--recompute-modules", "layernorm"),
         "choose from core_attn, mlp"),
        (("--grad-reduce-in-bf16",), "needs --bf16"),
        (("--cross-entropy-loss-fusion", "--cross-entropy-impl", "megatron"), "contradicts"),
        (("--ckpt-format", "torch"), "invalid choice"),
        (("--load", "ckpt", "--finetune", "--no-load-optim"), "already loads the weights only"),
        (("--profile",), "add --use-pytorch-profiler"),
        (("--profile", "--use-pytorch-profiler"), "writes its trace to --tensorboard-dir"),
        (("--profile", "--profile-step-start", 5, "--profile-step-end", 5), "before"),
        (("--empty-unused-memory-level", 3), "invalid choice"),
        (("--dataloader-type", "cyclic"), "invalid choice"),
        (("--optimizer", "sgd"), "invalid choice"),
        (("--distributed-backend", "nccl", "--device", "cpu"), "megatron-slm runs gloo on CPU"),
        (("--exit-on-missing-checkpoint",), "needs --load"),
        (("--decoupled-min-lr", 1e-4), "--decoupled-min-lr needs --decoupled-lr"),
        (("--mock-data",), "--mock-data replaces the data"),
        # MOCK: --mock-data in place of --data-path
        (("MOCK", "--slm-ratio", 0.6), "select with --slm-ref-source online"),
        (("MOCK", "--sft-data", "x.jsonl"), "either --mock-data or --sft-data"),
        (("--decoupled-lr", 1e-4, "--min-lr", 1e-3), "must be >= its final rate"),
        (("--save", "c", "--save-interval", 2, "--save-retain-interval", 3),
         "--save-retain-interval 3 must be a multiple of --save-interval 2"),
        (("--save-retain-interval", 4), "needs --save and --save-interval"),
        (("--non-persistent-save-interval", 2), "--non-persistent-save-interval needs --save"),
        (("--non-persistent-ckpt-type", "local"), "invalid choice"),
        (("--iterations-to-skip", 3, 0), "--iterations-to-skip takes iterations >= 1"),
        (("--expert-tensor-parallel-size", 2),
         "--expert-tensor-parallel-size 2 x --expert-model-parallel-size 1 does not divide the 1 "
         "ranks of a pipeline stage"),
        (("--num-experts", 4, "--expert-tensor-parallel-size", 2),
         "--expert-tensor-parallel-size 2 above --tensor-model-parallel-size 1 is not offered"),
        (("--num-experts", 4, "--tensor-model-parallel-size", 2, "--sequence-parallel",
          "--expert-tensor-parallel-size", 1),
         "--expert-tensor-parallel-size 1 below --tensor-model-parallel-size 2 needs "
         "--expert-model-parallel-size > 1"),
        (("--expert-tensor-parallel-size", 0), "--expert-tensor-parallel-size must be >= 1"),
        (("--deterministic-mode", "--use-flash-attn"), "flash attention's backward is not"),
        (("--deterministic-mode", "--device", "cuda"),
         "--deterministic-mode on GPU needs NCCL_ALGO set to one of Tree, Ring, CollnetDirect, "
         "CollnetChain, ^NVLS (got None)"),
        (("--check-weight-hash-across-dp-replicas-interval", 0),
         "--check-weight-hash-across-dp-replicas-interval must be >= 1"),
        (("--moe-use-upcycling", "--load", "d", "--save", "m", "--pretrained-checkpoint", "p"),
         "--pretrained-checkpoint: --moe-use-upcycling starts from the dense --load checkpoint"),
    ],
)  # fmt: skip
def test_flags_that_do_not_fit_are_one_line(argv, message, capsys):
    mock = argv[0] == "MOCK"
    call = (lambda: _config("--mock-data", *argv[1:], data=())) if mock else lambda: _config(*argv)
    assert message in refusal(call, capsys)


def test_a_missing_checkpoint_starts_afresh_only_where_megatron_lm_would(tmp_path):
    """--load naming the --save directory that holds no checkpoint yet: a first run (None);
    with --exit-on-missing-checkpoint, or any other --load, one line instead."""
    from megatron_slm.training.loop import _checkpoint_to_load

    ckpt = str(tmp_path / "ckpt")

    def config(*argv):
        return parse_config(["--data-path", "A", "--train-iters", "4", *argv])

    assert _checkpoint_to_load(config("--load", ckpt, "--save", ckpt).checkpoint) is None
    for argv, message in [
        (("--load", ckpt, "--save", ckpt, "--exit-on-missing-checkpoint"), "no checkpoint there"),
        (("--load", ckpt, "--save", str(tmp_path / "other")), "no such checkpoint directory"),
        (("--load", ckpt, "--save", ckpt, "--finetune"), "no such checkpoint directory"),
    ]:
        with pytest.raises((ConfigError, CheckpointError), match=message):
            _checkpoint_to_load(config(*argv).checkpoint)


# MODEL_ARGS of Megatron-LM's examples/post_training/modelopt/conf/Qwen/*.sh (their
# --tokenizer-type and --padded-vocab-size left out: the vocabulary is given here).
QWEN3_8B = """--disable-bias-linear --untie-embeddings-and-output-weights
    --position-embedding-type rope --normalization RMSNorm --swiglu --num-layers 36
    --hidden-size 4096 --ffn-hidden-size 12288
    --num-attention-heads 32 --group-query-attention --num-query-groups 8 --kv-channels 128
    --qk-layernorm --seq-length 4096 --max-position-embeddings 40960 --rotary-percent 1.0
    --rotary-base 1000000"""
QWEN25_7B = """--disable-bias-linear --add-qkv-bias --position-embedding-type rope
    --normalization RMSNorm --swiglu --num-layers 28 --hidden-size 3584 --ffn-hidden-size 18944
    --num-attention-heads 28 --group-query-attention --num-query-groups 4 --kv-channels 128
    --seq-length 4096 --max-position-embeddings 32768 --rotary-percent 1.0 --rotary-base 1000000
    --untie-embeddings-and-output-weights"""
# Megatron-LM's examples/mixtral/train_mixtral_8x7b_distributed.sh: MODEL_ARGS and MOE_ARGS (with
# the --use-distributed-optimizer of its MODEL_PARALLEL_ARGS)
MIXTRAL_8X7B = """--use-mcore-models --disable-bias-linear --seq-length 4096
    --max-position-embeddings 32768 --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
    --num-attention-heads 32 --init-method-std 0.01 --attention-dropout 0.0 --hidden-dropout 0.0
    --normalization RMSNorm --position-embedding-type rope --swiglu
    --untie-embeddings-and-output-weights --group-query-attention --num-query-groups 8
    --no-masked-softmax-fusion --no-position-embedding --rotary-base 1000000
    --num-experts 8 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss
    --moe-aux-loss-coeff 1e-2 --moe-grouped-gemm --moe-token-dispatcher-type alltoall
    --overlap-param-gather --overlap-grad-reduce --use-distributed-optimizer"""


@pytest.mark.parametrize(
    "flags, vocab, published",
    [(QWEN3_8B, 151936, 8_190_735_360), (QWEN25_7B, 152064, 7_615_616_512),
     (MIXTRAL_8X7B, 32000, 46_702_792_704)],
    ids=["qwen3-8b", "qwen2.5-7b", "mixtral-8x7b"],
)  # fmt: skip
def test_qwen_scripts_build_the_published_models(flags, vocab, published):
    """Megatron-LM's Qwen flags (--qk-layernorm, --add-qkv-bias) and its Mixtral 8x7B script
    (--moe-grouped-gemm included) describe models with the parameter counts published for
    them."""
    base = ("--data-path", "A", "--tokenizer-type", "NullTokenizer", "--vocab-size", vocab,
            "--train-iters", 4, "--global-batch-size", 8, "--micro-batch-size", 1)  # fmt: skip
    cfg = parse_config([str(a) for a in (*base, *flags.split())])
    arch = cfg.model.architecture(vocab)
    assert arch.num_parameters(vocab) == published
    assert arch.qk_layernorm == ("--qk-layernorm" in flags)
    assert arch.add_qkv_bias == ("--add-qkv-bias" in flags) and not arch.add_bias_linear


def _deterministic_run(rank, world, argv):
    """``python -m megatron_slm.pretrain`` in this process: what it leaves set."""
    from megatron_slm import pretrain

    assert pretrain.main([str(a) for a in argv]) == 0
    return torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")


def test_deterministic_mode_sets_torch_and_trains_alike(corpus, tmp_path):
    """--deterministic-mode turns torch's deterministic algorithms on (an op without one would
    raise: a blend of two sources counts its tokens per source without index_add_) and sets
    cuBLAS's reproducible workspace; on CPU its steps are bitwise those without it."""
    blend = ("--data-path", "0.5", corpus, "0.5", corpus)
    runs = []
    for flags in ((), ("--deterministic-mode",)):
        log = str(tmp_path / f"run{len(runs)}.jsonl")
        argv = [*tiny_args(corpus, log, 3, *blend, *flags), "--device", "cpu"]
        (state,) = run_distributed(_deterministic_run, 1, argv)
        runs.append((state, read_steps(log)))
    (plain_state, plain), (state, steps) = runs
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # (a user's own wins)
    assert plain_state[0] is False and state == (True, workspace)
    assert [(r["loss"], r["grad_norm"]) for r in steps] == [
        (r["loss"], r["grad_norm"]) for r in plain
    ]
