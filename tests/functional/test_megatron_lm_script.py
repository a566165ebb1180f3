"""A Megatron-LM Llama pretraining script runs through ``python -m megatron_slm.pretrain`` as it is.

The flag groups are those of Megatron-LM's ``examples/llama/train_llama3_8b_h100_fp8.sh`` (bf16 on
GPU there, fp32 on CPU here; its FP8 and decoupled-learning-rate flags are not supported), with the
sizes cut to the tiny preset and its paths pointed at a test corpus. Two ranks run it under
``torchrun``, with the distributed optimizer and overlapped communication as the script asks.

- The first run finds no checkpoint in ``--load`` (the script's ``--save`` directory): it starts
  from scratch, as Megatron-LM does, and the same command later resumes where it stopped.
- Its per-step losses are exactly those of the same training written with megatron-slm's own flags
  only: the flags that describe the model change nothing, and neither do selective recompute,
  ``--manual-gc``, ``--no-mmap-bin-files``, ``--num-dataset-builder-threads`` or the profiler
  (whose trace of steps 3 and 4 lands in ``--tensorboard-dir``).
"""

from __future__ import annotations

import glob
import json

import pytest

from tests.functional.pretrain_helpers import (
    VOCAB_FLAG,
    make_null_corpus,
    read_steps,
    run_pretrain,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_null_corpus(str(tmp_path_factory.mktemp("llama_script")), "c", [40] * 200)


# The script's flag groups, as its bash arrays hold them. The model: the tiny preset, written as
# a Megatron-LM script writes a Llama.
SHAPE = (
    "--num-layers 4 --hidden-size 64 --ffn-hidden-size 176 --num-attention-heads 4 "
    "--num-query-groups 2 --seq-length 32 --max-position-embeddings 256 --rotary-base 1000000 "
    "--init-method-std 0.0134"
).split()
LLAMA = (
    "--use-mcore-models --group-query-attention --kv-channels 16 --position-embedding-type rope "
    "--rotary-percent 1.0 --attention-dropout 0.0 --hidden-dropout 0.0 --swiglu "
    "--attention-backend auto --untie-embeddings-and-output-weights --disable-bias-linear "
    "--normalization RMSNorm"
).split()
SCHEDULE = (
    "--micro-batch-size 2 --global-batch-size 8 --lr-decay-samples 40 --lr-warmup-samples 16 "
    "--lr 0.003 --min-lr 0.0003 --decoupled-lr 0.005 --decoupled-min-lr 0.00045 "
    "--lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 "
    "--adam-beta2 0.95"
).split()
TRAINING = (
    "--cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc --manual-gc-interval 2 "
    "--empty-unused-memory-level 1 --exit-duration-in-mins 235 --recompute-activations "
    "--cross-entropy-fusion-impl native --rerun-mode disabled "
    "--no-use-tokenizer-model-from-checkpoint-args --use-cpu-initialization"
).split()
PARALLEL = "--tensor-model-parallel-size 1 --context-parallel-size 1".split()
DDP = "--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather".split()
EVAL = "--log-interval 1 --eval-iters 2 --eval-interval 3 --save-interval 1000".split()
LOGGING = (
    "--log-throughput --profile --use-pytorch-profiler --profile-step-start 2 "
    "--profile-step-end 4 --ckpt-format torch_dist --distributed-timeout-minutes 60"
).split()


def _data(prefix, cache):
    return ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB_FLAG,
            "--data-cache-path", cache, "--split", "99,1,0"]  # fmt: skip


def _script(prefix, tmp, samples):
    return [*SHAPE, *LLAMA, *SCHEDULE, "--train-samples", samples, *TRAINING, *PARALLEL, *DDP,
            *_data(prefix, tmp / "cache"), "--no-create-attention-mask-in-dataloader",
            "--no-mmap-bin-files", "--num-dataset-builder-threads", 2, "--num-workers", 1, *EVAL,
            *LOGGING,
            "--save", tmp / "ckpt", "--load", tmp / "ckpt", "--tensorboard-dir", tmp / "tb",
            "--log-loss-file", tmp / "script.jsonl"]  # fmt: skip


def _validations(path):
    with open(path) as f:
        return [r["validation_loss"] for r in map(json.loads, f) if "validation_loss" in r]


def test_a_megatron_lm_llama_script_trains_and_resumes_as_it_is(corpus, tmp_path):
    first = run_pretrain(_script(corpus, tmp_path, 48), nproc=2)
    assert "holds no checkpoint yet: training starts from scratch" in first.stderr
    script = read_steps(tmp_path / "script.jsonl")
    assert [r["iteration"] for r in script] == list(range(1, 7))

    plain = [*SHAPE, "--model-preset", "tiny", *SCHEDULE, "--train-samples", 48, *DDP,
             *_data(corpus, tmp_path / "cache"), *EVAL,
             "--log-loss-file", tmp_path / "plain.jsonl"]  # fmt: skip
    run_pretrain(plain, nproc=2)
    reference = read_steps(tmp_path / "plain.jsonl")
    assert [r["loss"] for r in script] == [r["loss"] for r in reference]
    assert [r["lr"] for r in script] == [r["lr"] for r in reference]
    validations = _validations(tmp_path / "script.jsonl")
    assert len(validations) == 2 and validations == _validations(tmp_path / "plain.jsonl")

    traces = glob.glob(str(tmp_path / "tb" / "*.pt.trace.json"))
    assert len(traces) == 1  # rank 0 only (--profile-ranks 0)
    with open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    profiled = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep")})
    assert len(profiled) == 2  # the steps after 2 finished, up to 4: steps 3 and 4

    # The same command, trained longer: it resumes from the checkpoint of step 6.
    again = run_pretrain(_script(corpus, tmp_path, 64), nproc=2)
    assert "loaded" in again.stderr and "at iteration 6" in again.stderr
    resumed = read_steps(tmp_path / "script.jsonl")
    assert [r["iteration"] for r in resumed] == [*range(1, 7), 7, 8]
