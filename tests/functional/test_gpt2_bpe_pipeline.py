"""A Megatron-LM GPT user's pipeline with their two tokenizer files, as real commands:
``tools/train_tokenizer.py`` writes ``vocab.json``/``merges.txt``; ``tools/preprocess_data.py``
takes ``--tokenizer-type GPT2BPETokenizer --vocab-file --merge-file``; Megatron-LM's
``examples/gpt3/train_gpt3_175b_distributed.sh`` flags run as they are (sizes cut, fp32 on CPU:
no ``--tokenizer-type``, the files name it; no preset and no architecture flag, so Megatron-LM's
model: GPT-3's architecture, FFN 4h); the launch script trains on the files
(``VOCAB_FILE``/``MERGE_FILE``); the checkpoint records both files, and the Hugging Face export
(no tokenizer flags) is a ``GPT2LMHeadModel`` whose logits are ours, with a tokenizer giving the
trained ids (a Llama target is refused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_slm.checkpoint import read_checkpoint
from megatron_slm.data.tokenizer import build_tokenizer
from megatron_slm.models.presets import GPT3_KIND
from tests.dist_helpers import free_port, run_distributed
from tests.functional.pretrain_helpers import REPO, read_steps, run_pretrain, run_tool

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")

WORDS = "the model reads every token of the corpus and learns which ones matter most".split()


def _our_logits(rank, world, load: str, tokens):
    """In a spawned rank: the checkpoint loaded at TP=1 by the runtime, its fp32 logits over the
    real vocabulary."""
    from megatron_slm.launch import initialize
    from megatron_slm.runtime import LoadArgs, forward_logits, load_model, plan_load

    lm = load_model(plan_load(LoadArgs(load=load), tokenizer="none"), initialize(device="cpu"))
    with torch.no_grad():
        return forward_logits(lm, tokens)


def _gpt3_script_args(data: str, files: list[str], ckpt: str, tb: str) -> list:
    """The script's flag groups as it writes them: GPT_MODEL_ARGS (sizes cut), TRAINING_ARGS
    (lengths and the batch's step schedule cut, --fp16 left out on CPU), MODEL_PARALLEL_ARGS
    (1 x 1), DATA_ARGS and EVAL_AND_LOGGING_ARGS (intervals cut)."""
    return [
        "--num-layers", 2, "--hidden-size", 64, "--num-attention-heads", 4,
        "--seq-length", 32, "--max-position-embeddings", 32, "--attention-backend", "auto",
        "--micro-batch-size", 2, "--global-batch-size", 8,
        "--step-batch-size-schedule", "0:2 64:4 128:8", "--train-iters", 4,
        "--weight-decay", 0.1, "--adam-beta1", 0.9, "--adam-beta2", 0.95,
        "--init-method-std", 0.006, "--clip-grad", 1.0, "--lr", "6.0e-5",
        "--lr-decay-style", "cosine", "--min-lr", "6.0e-6", "--lr-warmup-fraction", ".001",
        "--lr-decay-iters", 3,
        "--tensor-model-parallel-size", 1, "--pipeline-model-parallel-size", 1,
        "--data-path", data, "--vocab-file", files[1], "--merge-file", files[3],
        "--split", "949,50,1",
        "--log-interval", 1, "--save-interval", 4, "--eval-interval", 2, "--save", ckpt,
        "--load", ckpt, "--eval-iters", 1, "--tensorboard-dir", tb,
    ]  # fmt: skip


def test_gpt2_bpe_files_from_tokenizing_to_export(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = np.random.default_rng(0)
    # Enough sequences that the script's 949,50,1 split leaves one in the test split.
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(30, 50)))) for _ in range(800)]
    texts[3] = "Numbers 12345, naïve café 🙂 and it's <|endoftext|> in a text"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prefix = tmp_path / "gpt2"
    run_tool("train_tokenizer", "--input", corpus, "--model-prefix", prefix,
          "--vocab-size", 320, "--tokenizer-type", "GPT2BPETokenizer")  # fmt: skip
    files = ["--vocab-file", f"{prefix}-vocab.json", "--merge-file", f"{prefix}-merges.txt"]
    run_tool("preprocess_data", "--input", corpus, "--output-prefix", tmp_path / "c",
          "--tokenizer-type", "GPT2BPETokenizer", *files, "--append-eod")  # fmt: skip
    tok = build_tokenizer("GPT2BPETokenizer", files[1], None, files[3])
    data = str(tmp_path / "c_text_document")
    dataset = IndexedDataset(data)  # (its arrays are views of its memory map: kept alive)
    np.testing.assert_array_equal(dataset[3], [*tok.tokenize(texts[3]), tok.eod])

    # Megatron-LM's GPT-3 script, as it is.
    gpt3 = tmp_path / "gpt3"
    proc = run_pretrain(_gpt3_script_args(data, files, str(gpt3), str(tmp_path / "tb")))
    gpt3_line = "GPT-3 architecture (LayerNorm, GeLU, learned positions, biases, tied embeddings)"
    assert gpt3_line in proc.stderr
    assert "4 heads in 4 KV groups, FFN 256," in proc.stderr  # 4h, h = 64
    # The schedule's thresholds of 64 and 128 tokens (2 and 4 samples): steps of 2, 4, 8, 8
    assert "global batch size 4 from step 2" in proc.stderr
    assert "global batch size 8 from step 3" in proc.stderr
    info = read_checkpoint(str(gpt3))
    assert (info.model.ffn_hidden_size, info.model.num_query_groups) == (256, 4)
    assert info.model.kind == GPT3_KIND
    record = info.tokenizer
    assert record["type"] == "GPT2BPETokenizer" and record["vocab_size"] == tok.vocab_size
    assert (record["model"], record["merge_file"]) == (files[1], files[3])
    assert record["sha256"] == tok.unique_identifiers["sha256"]

    # The launch script as a user runs it outside SLURM (torchrun), the files from VOCAB_FILE and
    # MERGE_FILE, 16 samples with the global batch ramping up from 2 to 4 over the first 4.
    run = tmp_path / "run"
    env = {
        **os.environ, "REPO_DIR": REPO, "PYTHON": sys.executable, "PYTHONPATH": REPO,
        "PET_MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
        "MODEL_PRESET": "tiny", "DEVICE": "cpu", "TP": "1", "PP": "1", "PRECISION": "fp32",
        "SEQ_LENGTH": "32", "MICRO_BATCH_SIZE": "2", "GLOBAL_BATCH_SIZE": "4",
        "TRAIN_SAMPLES": "16", "RAMPUP_BATCH_SIZE": "2 2 4", "LR_WARMUP_SAMPLES": "4",
        "LR": "3e-3", "MIN_LR": "0",
        "VOCAB_FILE": files[1], "MERGE_FILE": files[3],
        "DATA_PATH": data, "SPLIT": "100,0,0", "EVAL_INTERVAL": "0",
        "LOG_INTERVAL": "1", "RUN_DIR": str(run), "LOAD": "",
        "LOG_LOSS_FILE": str(tmp_path / "log.jsonl"),
    }  # fmt: skip
    script = os.path.join(REPO, "examples", "train_reference.sh")
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = read_steps(str(tmp_path / "log.jsonl"))
    # megatron-core's ramp: 2, 2 (4 samples ramped), then 4 until 16 samples: 2+2+4+4+4
    assert [r["global_batch_size"] for r in steps] == [2, 2, 4, 4, 4]
    assert steps[-1]["consumed_samples"] == 16
    # an untrained model's loss over this vocabulary: about log(320)
    assert abs(steps[0]["loss"] - np.log(tok.vocab_size)) < 1.0
    assert read_checkpoint(str(run / "checkpoints")).tokenizer == record

    run_tool("convert_checkpoint", "megatron-to-hf", "--load", gpt3, "--save", tmp_path / "hf")
    with open(tmp_path / "hf" / "config.json") as f:
        hf_config = json.load(f)
    assert (hf_config["architectures"], hf_config["model_type"]) == (["GPT2LMHeadModel"], "gpt2")
    assert (hf_config["n_inner"], hf_config["n_positions"]) == (256, 32)
    assert (hf_config["vocab_size"], hf_config["activation_function"]) == (tok.vocab_size, "gelu")
    # three rows of the training data, every position of the learned table
    rows = torch.from_numpy(np.concatenate([dataset[i] for i in range(4)])[:96].astype(np.int64))
    rows = rows.reshape(3, 32)
    (ours,) = run_distributed(_our_logits, 1, str(gpt3), rows)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    with torch.no_grad():
        theirs = model.eval()(rows).logits
    assert type(model).__name__ == "GPT2LMHeadModel" and ours.shape == (3, 32, tok.vocab_size)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    llama = run_tool("convert_checkpoint", "megatron-to-hf", "--load", gpt3, "--save",
                  tmp_path / "llama", "--architecture", "LlamaForCausalLM", status=2)  # fmt: skip
    assert llama.stderr.strip().splitlines()[-1] == (
        "convert_checkpoint: error: --architecture LlamaForCausalLM: this checkpoint's "
        f"{gpt3_line} exports as GPT2LMHeadModel; "
        "LlamaForCausalLM/MistralForCausalLM needs RMSNorm, SwiGLU, RoPE, no biases"
    )
    assert not os.path.exists(tmp_path / "llama")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in texts[:8]:
        assert hf(text).input_ids == tok.tokenize_with_specials(text), text
    assert hf.eos_token_id == tok.eod
    with open(tmp_path / "hf" / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == tok.eod
