"""The evaluator on a tiny megatron GPT trained here (plain torch) to answer a tiny QA set.

- few-shot exact match is computed on extracted answers: the QA file's gold answer for one question
  differs from what the model was taught, so exactly that question is wrong;
- perplexity equals exp of the mean per-token loss computed independently (megatron-core's own
  ``model(labels=)`` loss over the same segments);
- tools/evaluate.py under torchrun at TP=2 reproduces the library's TP=1 report.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.dist_helpers import free_port, run_distributed
from tests.functional import hf_worker as worker

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ_LENGTH = 8
WRONG = {"what color is grass?": "purple"}  # taught "green"
DOCS = ["red green blue and the quick brown fox", "Question: what color is grass?", "a"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    tok_dir = worker.make_tokenizer(str(root / "tokenizer"))
    qa_path, ppl_data = str(root / "qa.jsonl"), str(root / "docs.jsonl")
    with open(qa_path, "w") as f:
        for q, a in worker.QA:
            f.write(json.dumps({"question": q, "answer": WRONG.get(q, a)}) + "\n")
    with open(ppl_data, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in DOCS)
    ((loss, report, n_tokens, ppl),) = run_distributed(
        worker.train_and_evaluate, 1, str(root), tok_dir, qa_path, ppl_data, SEQ_LENGTH, 100
    )
    return dict(
        root=root,
        qa=qa_path,
        docs=ppl_data,
        loss=loss,
        report=report,
        n_tokens=n_tokens,
        ppl=ppl,
    )


def test_fewshot_exact_match(trained):
    assert trained["loss"] < 0.05  # the model learned its answers
    (qa,) = trained["report"]["fewshot"]
    assert qa["questions"] == len(worker.QA) - worker.NUM_SHOTS
    for ex in qa["examples"]:
        assert ex["correct"] == (ex["extracted"] == ex["gold"])
        if ex["question"] in WRONG:
            assert ex["extracted"] == "green" and not ex["correct"]
        else:
            assert ex["correct"], ex
    assert qa["correct"] == qa["questions"] - len(WRONG)
    assert qa["exact_match"] == pytest.approx(qa["correct"] / qa["questions"])


def test_perplexity_is_exp_mean_token_loss(trained):
    (ppl,) = trained["report"]["perplexity"]
    assert ppl["documents"] == len(DOCS) and ppl["tokens"] == trained["n_tokens"]
    assert ppl["perplexity"] == pytest.approx(trained["ppl"], rel=1e-6)
    assert ppl["perplexity"] == pytest.approx(math.exp(ppl["loss_sum"] / ppl["tokens"]))


def test_cli_under_torchrun_tp2(trained, tmp_path):
    out = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        os.path.join(ROOT, "tools", "evaluate.py"),
        "--load",
        str(trained["root"] / "qa_ckpt"),
        "--device",
        "cpu",
        "--tensor-model-parallel-size",
        "2",
        "--perplexity-data",
        f"docs={trained['docs']}",
        "--seq-length",
        str(SEQ_LENGTH),
        "--fewshot-data",
        trained["qa"],
        "--num-shots",
        str(worker.NUM_SHOTS),
        "--output",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "EM" in run.stdout and "ppl" in run.stdout
    report = json.load(open(out))
    lib = trained["report"]
    assert report["fewshot"][0]["examples"] == lib["fewshot"][0]["examples"]
    assert report["perplexity"][0]["tokens"] == lib["perplexity"][0]["tokens"]
    assert report["perplexity"][0]["perplexity"] == pytest.approx(
        lib["perplexity"][0]["perplexity"], rel=1e-5
    )
