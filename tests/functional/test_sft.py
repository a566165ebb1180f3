"""SFT in the trainer end to end, as users run it: a tiny SentencePiece model trained from scratch
(the base checkpoint), fine-tuned with ``--load BASE --finetune --sft-data``; a run stopped and
resumed gives the straight run's losses exactly; the SFT checkpoint exports to a Hugging Face
directory whose tokenizer (ids, chat template) and logits transformers reproduces."""

import json
import os

import numpy as np
import pytest
import torch

from megatron_slm.data import build_tokenizer, train_sentencepiece
from megatron_slm.data.chat import DEFAULT_CHAT_TEMPLATE
from tests.dist_helpers import run_distributed
from tests.functional import hf_worker
from tests.functional.pretrain_helpers import read_steps, run_pretrain

pytestmark = pytest.mark.slow
WORDS = "keep drop the line menu home spam text about cats and dogs in a garden".split()


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_e2e")
    sp = train_sentencepiece(
        [" ".join(WORDS) + "\n<|user|> <|assistant|>"] * 30, str(root / "sp"), 400
    )
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(24):
        doc = " ".join(rng.choice(WORDS, int(rng.integers(2, 8))))
        answer = "drop_doc()" if "spam" in doc else "keep_doc()"
        messages = [
            {"role": "user", "content": doc},
            {"role": "assistant", "content": answer},
        ]
        lines.append(json.dumps({"messages": messages}))
    seeds = root / "seeds.jsonl"
    seeds.write_text("\n".join(lines) + "\n")
    common = [
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp,
        "--sft-data", seeds, "--seq-length", 64, "--micro-batch-size", 2,
        "--global-batch-size", 4, "--lr", "3e-3", "--eval-interval", 0, "--log-interval", 1,
    ]  # fmt: skip
    base = str(root / "base")
    run_pretrain([*common, "--model-preset", "tiny", "--train-iters", 2, "--save", base])
    return root, sp, common, base


def _steps(root, common, name, iters, *extra):
    log = str(root / f"{name}.jsonl")
    run_pretrain([*common, "--train-iters", iters, "--log-loss-file", log, *extra])
    return read_steps(log)


def test_finetune_resume_is_exact(sft_setup):
    root, _, common, base = sft_setup
    ft = ("--load", base, "--finetune")
    straight = _steps(root, common, "straight", 4, *ft, "--save", str(root / "sft"))
    assert [r["iteration"] for r in straight] == [1, 2, 3, 4]  # fresh iteration count
    assert straight[-1]["consumed_samples"] == 16
    part = str(root / "part")
    first = _steps(root, common, "first", 4, *ft, "--save", part, "--exit-interval", 2)
    resumed = _steps(root, common, "resumed", 4, "--load", part)
    assert [r["iteration"] for r in first + resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in first + resumed] == [r["loss"] for r in straight]
    assert straight[-1]["loss"] < straight[0]["loss"]


def _export_and_logits(rank, world, ckpt, save, tokens):
    from megatron_slm.evaluation import load_eval_model
    from megatron_slm.launch import initialize
    from megatron_slm.runtime import forward_logits

    rc, out, err = hf_worker._run_convert_cli("megatron-to-hf", "--load", ckpt, "--save", save)
    assert rc == 0, err
    m = load_eval_model(ckpt, initialize(device="cpu"))
    return forward_logits(m, tokens)


def test_export_after_sft_loads_in_transformers(sft_setup):
    from transformers import AutoTokenizer

    root, sp, common, _ = sft_setup
    ckpt = str(root / "sft")
    if not os.path.isdir(ckpt):  # the resume test trains it; alone, train it here
        _steps(root, common, "sft", 4, "--load", str(root / "base"), "--finetune", "--save", ckpt)
    save = str(root / "hf")
    tok = build_tokenizer("SentencePieceTokenizer", sp)
    messages = [{"role": "user", "content": "the menu spam"}]
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    tokens = torch.tensor([prompt_ids])
    ((ours,),) = (run_distributed(_export_and_logits, 1, ckpt, save, tokens),)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(save, name)), name
    hf_tok = AutoTokenizer.from_pretrained(save)
    assert hf_tok.chat_template == DEFAULT_CHAT_TEMPLATE
    prompt = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert hf_tok(prompt, add_special_tokens=False).input_ids == prompt_ids
    text = "cats and dogs  in a garden\n"
    assert hf_tok(text).input_ids == tok.tokenize(text)
    theirs = hf_worker.hf_logits(save, tokens)
    torch.testing.assert_close(theirs, ours[..., : theirs.shape[-1]], rtol=0, atol=1e-4)
