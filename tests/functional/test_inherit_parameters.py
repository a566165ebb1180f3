"""Parameter inheritance as a user runs it: a 4-layer model is trained on CPU, a 2-layer,
half-width model inherits from it with ``tools/inherit_parameters.py`` (the source loaded at TP=1,
TP=2 and PP=2 under torchrun, with equal results), and the trainer continues from it with
``--load SMALL --finetune``. The inherited model starts far below a random initialisation on
held-out text and is still ahead after the same number of steps; activation importance keeps a
lower calibration loss than a random choice of channels, neurons and heads."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests import zygote
from tests.dist_helpers import free_port
from tests.functional.pretrain_helpers import (
    VOCAB_FLAG,
    make_null_corpus,
    read_steps,
    run_pretrain,
)

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = ["--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB_FLAG]
TRAIN = [
    "--seq-length", 32, "--micro-batch-size", 4, "--global-batch-size", 8, "--lr", "3e-3",
    "--lr-warmup-iters", 2, "--eval-interval", 0, "--log-interval", 1, "--split", "100,0,0",
]  # fmt: skip
# tiny (4 layers, 64 wide, FFN 176, 4 heads in 2 KV groups) -> 2 layers, 32 wide, FFN 96,
# 2 heads in 1 group.
TARGET = [
    "--hidden-size", 32, "--ffn-hidden-size", 96, "--num-attention-heads", 2,
    "--num-query-groups", 1,
]  # fmt: skip
CONTINUE_STEPS = 30


def _inherit(load, save, *extra, nproc=1, check=True):
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        cmd += ["--master-port", str(free_port())]
    cmd += [os.path.join(REPO, "tools", "inherit_parameters.py"), "--device", "cpu"]
    cmd += ["--load", str(load), "--save", str(save), *map(str, extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    proc = zygote.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"inherit failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _report(save) -> dict:
    with open(os.path.join(save, "inheritance_report.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inherit")
    train = make_null_corpus(str(root), "train", [80] * 300, seed=0)
    held = make_null_corpus(str(root), "held", [80] * 100, seed=1)
    big = root / "big"
    run_pretrain(
        ["--data-path", train, *TOKENIZER, "--model-preset", "tiny", *TRAIN, "--train-iters", 80,
         "--save", big, "--log-loss-file", root / "big.jsonl"]
    )  # fmt: skip
    calib = ["--calibration-data", train, "--calibration-samples", 32,
             "--calibration-seq-length", 32]  # fmt: skip
    small = root / "small"
    _inherit(big, small, *TARGET, "--layers", "ends:1,1", *calib)
    return {"root": root, "train": train, "held": held, "big": big, "small": small, "calib": calib}


def test_checkpoint_records_the_inheritance(setup):
    it = os.path.join(setup["small"], "iter_0000000")
    with open(os.path.join(it, "megatron_slm.json")) as f:
        meta = json.load(f)
    assert meta["model"]["num_layers"] == 2 and meta["model"]["hidden_size"] == 32
    assert meta["tokenizer"]["type"] == "NullTokenizer"
    inh = meta["inheritance"]
    assert inh["source"].startswith(str(setup["big"]))
    assert inh["layers_method"] == "ends" and inh["width_importance"] == "activation"
    kept = inh["kept"]
    assert kept["layers"] == [0, 3] and len(kept["hidden"]) == 32
    assert sorted(kept["ffn"]) == ["0", "3"] and all(len(v) == 96 for v in kept["ffn"].values())
    assert all(len(v) == 1 and len(v[0]) == 2 for v in kept["heads"].values())
    report = _report(setup["small"])
    assert report["parameters"]["target"] < report["parameters"]["source"] / 2
    loss = report["calibration"]["loss"]
    assert loss["source"] < loss["inherited"] < loss["random_init"]


def test_activation_importance_beats_random_and_magnitude_runs(setup):
    root, big, calib = setup["root"], setup["big"], setup["calib"]
    losses = {"activation": _report(setup["small"])["calibration"]["loss"]["inherited"]}
    for method in ("random", "magnitude"):
        save = root / f"small_{method}"
        _inherit(big, save, *TARGET, "--layers", "ends:1,1", "--width-importance", method, *calib)
        losses[method] = _report(save)["calibration"]["loss"]["inherited"]
    print("calibration loss of the inherited model by width importance:", losses)
    assert losses["activation"] < losses["random"] - 0.05, losses


def test_depth_by_block_importance(setup):
    save = setup["root"] / "small_depth"
    _inherit(setup["big"], save, "--num-layers", 2, "--layers", "importance", *setup["calib"])
    report = _report(save)
    scores = report["layers"]["block_importance"]
    assert len(scores) == 4 and all(0 < s < 2 for s in scores)
    top2 = sorted(sorted(range(4), key=lambda i: -scores[i])[:2])
    assert report["layers"]["kept"] == top2
    assert report["width"]["method"] is None  # depth only: no width ranking needed
    loss = report["calibration"]["loss"]
    assert loss["source"] < loss["inherited"] < loss["random_init"]


@pytest.mark.parametrize("layout", [("--tensor-model-parallel-size", 2),
                                    ("--pipeline-model-parallel-size", 2)])  # fmt: skip
def test_source_at_tp2_and_pp2_gives_the_same_model(setup, tmp_path, layout):
    save = tmp_path / "small"
    _inherit(setup["big"], save, *TARGET, "--layers", "ends:1,1", *setup["calib"], *layout, nproc=2)
    ours, ref = _report(save), _report(setup["small"])
    for key in ("source", "inherited"):
        a, b = ours["calibration"]["loss"][key], ref["calibration"]["loss"][key]
        assert abs(a - b) < 1e-4, (key, a, b)
    meta = [
        json.load(open(os.path.join(d, "iter_0000000", "megatron_slm.json")))
        for d in (save, setup["small"])
    ]
    assert meta[0]["inheritance"]["kept"] == meta[1]["inheritance"]["kept"]


def test_inherited_model_trains_ahead_of_random_init(setup):
    """Continue on the held-out corpus (neither model saw it): step 1's loss is the held-out loss
    at initialisation; the last steps compare the two after equal training."""
    root, held = setup["root"], setup["held"]
    common = ["--data-path", held, *TOKENIZER, *TRAIN, "--train-iters", CONTINUE_STEPS]
    run_pretrain([*common, "--load", setup["small"], "--finetune",
                  "--log-loss-file", root / "inherited.jsonl"])  # fmt: skip
    run_pretrain([*common, "--model-preset", "tiny", "--num-layers", 2, *TARGET,
                  "--log-loss-file", root / "random.jsonl"])  # fmt: skip
    inh = [s["loss"] for s in read_steps(root / "inherited.jsonl")]
    rnd = [s["loss"] for s in read_steps(root / "random.jsonl")]
    assert len(inh) == len(rnd) == CONTINUE_STEPS
    print(f"held-out loss at step 1: inherited {inh[0]:.3f}, random init {rnd[0]:.3f}; "
          f"mean of the last 5 steps: inherited {sum(inh[-5:]) / 5:.3f}, "
          f"random {sum(rnd[-5:]) / 5:.3f}")  # fmt: skip
    assert inh[0] < rnd[0] - 1.0
    assert sum(inh[-5:]) < sum(rnd[-5:])
