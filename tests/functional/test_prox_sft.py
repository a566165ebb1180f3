"""ProX refining model trained end to end on CPU: synthetic corpus with injected noise (navigation,
spam, URLs, footers at recorded line numbers) -> seed programs from a scripted labeller standing in
for the teacher (through ``annotate``: prompts, chunking, grammar check, seed format) -> SFT of a
tiny model (``python -m megatron_slm.pretrain --sft-data``) -> HF export -> ``tools/prox_eval.py``
on held-out seeds and ``tools/prox_refine.py`` on held-out documents, scored against the
recorded noise lines."""

import json
import os
import random
import re
import sys

import pytest

from megatron_slm.refine.annotate import annotate
from megatron_slm.refine.annotate_config import AnnotateConfig
from megatron_slm.refine.prompts import SYSTEM_PROMPT
from tests import zygote
from tests.functional.pretrain_helpers import run_pretrain
from tests.unit.refine import read_jsonl, write_jsonl

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = (
    "the water cycle moves rain over land and sea plants use light to make sugar cells divide "
    "heat flows from warm bodies a prime number has two divisors rivers carve deep valleys"
).split()
NOISE = [
    "NAV home | news | login",
    "BUY NOW cheap deals !!!",
    "http://spam.example/click?id=7",
    "(c) footer all rights reserved",
]
ITERS = int(os.environ.get("PROX_SFT_ITERS", "1000"))
# Measured on 2 cores (150 held-out documents): copying line numbers generalises with many distinct
# documents, not with epochs over a few. 2 layers x 500 steps: chunk line F1 0.68 on 400 training
# documents, 0.82 on 3000, 0.85 with document-stage seeds from 600 of them; x 1000 steps: 0.94.
# 4 layers or hidden 128 learn slower at this budget (0.56, 0.82).
TRAIN_DOCS, DOC_STAGE_DOCS, HELDOUT_DOCS = 3000, 600, 150


def clean_line(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 8))) + "."


def make_doc(rng, spam: bool):
    """``(text, noise line numbers)``."""
    n = rng.randint(4, 6)
    if spam:
        return "\n".join(rng.choice(NOISE) for _ in range(n)), list(range(n))
    lines = [clean_line(rng) for _ in range(n)]
    noise = sorted(rng.sample(range(n + 2), rng.randint(0, 2)))
    for i in noise:
        lines.insert(i, rng.choice(NOISE))
    return "\n".join(lines), noise


class ScriptedLabeller:
    """Stands in for the teacher: grades and programs from the recorded noise."""

    retries = 0

    def __init__(self, noise_by_text):
        self.noise_by_text = noise_by_text

    def answer_all(self, requests, max_tokens, on_answer):
        for key, messages in requests:
            content = messages[-1]["content"]
            if "[doc]" in content:
                chunk = content.rsplit("[doc]\n", 1)[1]  # after the few-shot examples
                numbers = re.findall(r"^\[(\d+)\](.*)$", chunk, re.MULTILINE)
                calls = [
                    f"remove_lines(line_start={int(i)}, line_end={int(i)})"
                    for i, line in numbers
                    if line in NOISE
                ]
                on_answer(key, "\n".join(calls) or "keep_chunk()", None)
            else:
                text = content.split("<extract>\n", 1)[1].split("\n</extract>", 1)[0]
                lines = text.split("\n")
                spam = len(self.noise_by_text[text]) == len(lines)
                on_answer(key, f"Score: {0 if spam else 4}", None)


def tool(name, *args):
    proc = zygote.run(
        [sys.executable, os.path.join(REPO, "tools", name), *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore"),
        timeout=600,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from megatron_slm.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("prox_sft")
    docs = {"train": [], "heldout": []}
    for split, count, seed in (("train", TRAIN_DOCS, 0), ("heldout", HELDOUT_DOCS, 1)):
        rng = random.Random(seed)
        for i in range(count):
            text, noise = make_doc(rng, spam=i % 5 == 0)
            docs[split].append({"id": f"{split}{i}", "text": text, "noise": noise})
        write_jsonl(root / f"{split}.jsonl", docs[split])
    noise_by_text = {d["text"]: d["noise"] for split in docs.values() for d in split}
    for split in docs:  # the chunk stage sees the documents the document stage keeps
        kept = [d for d in docs[split] if len(d["noise"]) < len(d["text"].split("\n"))]
        write_jsonl(root / f"{split}_kept.jsonl", kept)
    # the document stage is learned from far fewer examples: its seeds come from a part
    write_jsonl(root / "train_doc_stage.jsonl", docs["train"][:DOC_STAGE_DOCS])
    write_jsonl(root / "heldout_doc_stage.jsonl", docs["heldout"])
    # the tokenizer also sees the program syntax and the chat markup: short programs, fast SFT;
    # single digits (as Llama's): a line number is copied digit by digit
    programs = [
        f"remove_lines(line_start={i}, line_end={i})\nkeep_chunk()\nkeep_doc()\ndrop_doc()"
        for i in range(10)
    ]
    markup = ["<|system|>\n<|user|>\n<|assistant|>\n[doc]\n[/doc]\n" + SYSTEM_PROMPT] * 50
    lines = [f"[{i:03d}]" for i in range(10)] * 5
    corpus = [d["text"] for d in docs["train"]] + programs * 60 + markup + lines
    spm = train_sentencepiece(corpus, str(root / "tok"), 480, split_digits=True)
    labeller = ScriptedLabeller(noise_by_text)
    seeds = {}
    for split in docs:
        for stage in ("doc", "chunk"):
            out = str(root / f"{split}_{stage}.jsonl")
            config = AnnotateConfig(
                input=[str(root / f"{split}_{'doc_stage' if stage == 'doc' else 'kept'}.jsonl")],
                stage=stage,
                teacher=str(root),  # unused: the labeller answers
                output=out,
                tokenizer=spm,  # read as the export will write it
            )
            annotate(config, log=lambda m: None, teacher=labeller)
            seeds[split, stage] = out
    heldout = str(root / "heldout_seeds.jsonl")
    write_jsonl(
        heldout, read_jsonl(seeds["heldout", "doc"]) + read_jsonl(seeds["heldout", "chunk"])
    )
    ckpt = str(root / "ckpt")
    run_pretrain(
        [
            "--sft-data",
            seeds["train", "doc"],
            seeds["train", "chunk"],
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            spm,
            "--model-preset",
            "tiny",
            "--num-layers",
            2,
            "--seq-length",
            256,
            "--micro-batch-size",
            8,
            "--global-batch-size",
            8,
            "--train-iters",
            ITERS,
            "--lr",
            "3e-3",
            "--min-lr",
            "3e-4",
            "--lr-warmup-iters",
            20,
            "--log-interval",
            50,
            "--eval-interval",
            0,
            "--save",
            ckpt,
        ]  # fmt: skip
    )
    hf = str(root / "hf")
    tool("convert_checkpoint.py", "megatron-to-hf", "--load", ckpt, "--save", hf)
    return root, hf, heldout, docs["heldout"]


@pytest.fixture(scope="module")
def report(trained):
    root, hf, heldout, _ = trained
    report_path = root / "eval.json"
    proc = tool(
        "prox_eval.py", "--model", hf, "--data", heldout, "--output", report_path,
        "--predictions", root / "predictions.jsonl",
        "--doc-max-new-tokens", 16, "--chunk-max-new-tokens", 64,
    )  # fmt: skip
    print(proc.stderr)
    report = json.load(open(report_path))
    assert report["examples"]["doc"] > 0 and report["examples"]["chunk"] > 0
    return report


def test_eval_doc_f1(report):
    assert report["doc_drop"]["f1"] >= 0.9, report


def test_eval_chunk_f1(report):
    assert report["chunk_lines"]["f1"] >= 0.8, report


def test_predictions_file_gives_the_report(trained, report):
    """--predictions holds every example's program: scoring it independently gives the report."""
    from megatron_slm.refine.evaluate import Example, score

    root, _, heldout, _ = trained
    rows = read_jsonl(root / "predictions.jsonl")
    references = read_jsonl(heldout)
    assert [r["reference"] for r in rows] == [x["messages"][-1]["content"] for x in references]
    rescored = score(
        [Example(r["stage"], r["user"], r["reference"]) for r in rows],
        [r["prediction"] for r in rows],
    )
    assert rescored["chunk_lines"] == report["chunk_lines"]
    assert rescored["doc_drop"] == report["doc_drop"]


@pytest.fixture(scope="module")
def refined_counts(trained):
    root, hf, _, heldout_docs = trained
    out = root / "refined"
    tool(
        "prox_refine.py", "--input", root / "heldout.jsonl", "--output-dir", out,
        "--stage", "doc,chunk", "--doc-model", hf, "--chunk-model", hf, "--device", "cpu",
        "--doc-max-new-tokens", 16, "--chunk-max-new-tokens", 64,
    )  # fmt: skip
    results = {r["id"]: r for r in read_jsonl(out / "heldout.jsonl")}
    results.update({r["id"]: r for r in read_jsonl(out / "dropped" / "heldout.jsonl")})
    noise_total = noise_removed = clean_total = clean_removed = 0
    for doc in heldout_docs:
        r = results[doc["id"]]
        dropped = r["metadata"]["prox"]["decision"].startswith("drop")
        kept_lines = [] if dropped else r["text"].split("\n")
        for i, line in enumerate(doc["text"].split("\n")):
            # a kept document's lines survive in order; count by content (lines may repeat)
            gone = line not in kept_lines
            if not gone:
                kept_lines.remove(line)
            if i in doc["noise"]:
                noise_total += 1
                noise_removed += gone
            else:
                clean_total += 1
                clean_removed += gone
    print(
        f"noise removed {noise_removed}/{noise_total}, clean removed {clean_removed}/{clean_total}"
    )
    return noise_removed, noise_total, clean_removed, clean_total


def test_refine_removes_noise(refined_counts):
    noise_removed, noise_total, _, _ = refined_counts
    assert noise_removed >= 0.8 * noise_total, refined_counts


def test_refine_keeps_clean_lines(refined_counts):
    _, _, clean_removed, clean_total = refined_counts
    assert clean_removed <= 0.05 * clean_total, refined_counts
