"""A bf16 run that loads weights without the optimizer state (--finetune, --no-load-optim) trains
on from those weights. The mixed-precision optimizer keeps fp32 main copies of the parameters,
cloned when it is built (before the load): unless they are refreshed from the loaded weights, the
first step writes the random initialisation, updated, back into the model. The CPU runs cannot
show it (fp32 parameters are their own main copies; megatron-core's mixed-precision optimizer
wraps CUDA tensors only)."""

from __future__ import annotations

import pytest

from tests.functional.pretrain_helpers import make_null_corpus, read_steps, run_pretrain, tiny_args

pytestmark = pytest.mark.gpu

CUDA_BF16 = ("--device", "cuda", "--bf16")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A bf16 model trained 20 steps and saved: (corpus prefix, checkpoint, its losses)."""
    tmp = tmp_path_factory.mktemp("weights_only")
    prefix = make_null_corpus(str(tmp), "corpus", [40] * 400)
    ckpt, log = str(tmp / "ckpt"), str(tmp / "trained.jsonl")
    run_pretrain(tiny_args(prefix, log, 20, *CUDA_BF16, "--save", ckpt))
    losses = [r["loss"] for r in read_steps(log)]
    assert losses[0] - losses[-1] > 0.5, losses  # clearly better than random, for the check
    return prefix, ckpt, losses


@pytest.mark.parametrize(
    "load_flags, iters",
    [(("--finetune",), 3), (("--no-load-optim", "--override-opt-param-scheduler"), 23)],
    ids=["finetune", "no-load-optim"],
)
def test_weights_only_load_trains_on_from_the_loaded_weights(trained, tmp_path, load_flags, iters):
    prefix, ckpt, losses = trained
    learned = losses[0] - losses[-1]
    log = str(tmp_path / "loaded.jsonl")
    slow = ("--lr", "1e-7", "--min-lr", "0", "--lr-warmup-iters", "0")
    run_pretrain(tiny_args(prefix, log, iters, *CUDA_BF16, "--load", ckpt, *load_flags, *slow))
    loaded = [r["loss"] for r in read_steps(log)]
    assert len(loaded) == 3
    # At lr 1e-7 the weights barely move: every step's loss is the loaded model's (up to the
    # batch), not the random initialisation's that the first update would otherwise restore.
    for loss in loaded:
        assert abs(loss - losses[-1]) < 0.25 * learned, (loaded, losses)
