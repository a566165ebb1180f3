"""The evaluator and the ``megatron-slm`` lm-eval model on a tiny megatron GPT trained here (plain
torch) to answer a tiny QA set, against independent references:

- lm-eval's own ``hf`` model on the Hugging Face export of the same checkpoint: loglikelihoods
  (1e-4), greedy flags, rolling loglikelihoods, and a local generation task and a local
  multiple-choice task (per-sample answers and accuracies), at TP=1 and TP=2;
- greedy decoding with megatron-core's KV cache equals decoding without it (token for token, in
  one batch of prompts of different lengths, and one prompt at a time) and ``transformers``
  ``generate(do_sample=False)``;
- the generation task's exact match: the QA file's gold answer for one question differs from what
  the model was taught, so exactly that question is wrong;
- perplexity equals exp of the mean per-token loss computed independently (megatron-core's own
  ``model(labels=)`` loss over the same segments);
- tools/evaluate.py under torchrun at TP=2 reproduces the library's TP=1 report, and
  ``lm_eval --model megatron-slm`` (the installed CLI) gives the library's accuracy.
"""

import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tests import zygote
from tests.dist_helpers import free_port, run_distributed
from tests.functional import hf_worker as worker
from tests.functional import lm_eval_worker as lmw

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ_LENGTH = 8
WRONG = {"what color is grass?": "purple"}  # taught "green"
DOCS = ["red green blue and the quick brown fox", "Question: what color is grass?", "a"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    root = tmp_path_factory.mktemp("evaluate")
    tok_dir = worker.make_tokenizer(str(root / "tokenizer"))
    qa_path, ppl_data = str(root / "qa.jsonl"), str(root / "docs.jsonl")
    with open(qa_path, "w") as f:
        for q, a in worker.QA:
            f.write(json.dumps({"question": q, "answer": WRONG.get(q, a)}) + "\n")
    with open(ppl_data, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in DOCS)
    task_dir = lmw.write_tasks(str(root), qa_path)
    (((loss, report, n_tokens, ppl), ref, tp1),) = run_distributed(
        lmw.train_evaluate_and_compare, 1, str(root), tok_dir, task_dir, ppl_data, SEQ_LENGTH, 100
    )
    tp2, _ = run_distributed(lmw.ours, 2, str(root), task_dir, 2)
    return dict(
        root=root,
        qa=qa_path,
        docs=ppl_data,
        tasks=task_dir,
        loss=loss,
        report=report,
        n_tokens=n_tokens,
        ppl=ppl,
        ref=ref,
        ours={1: tp1, 2: tp2},
    )


def test_generation_task_exact_match(trained):
    assert trained["loss"] < 0.05  # the model learned its answers
    metrics = trained["report"]["lm_eval"][lmw.GEN_TASK]
    n = len(worker.QA) - worker.NUM_SHOTS
    assert metrics["exact_match,strip"] == pytest.approx((n - len(WRONG)) / n)
    answers = trained["ours"][1]["tasks"]["samples"][lmw.GEN_TASK]
    questions = [q for q, _ in worker.QA[worker.NUM_SHOTS :]]
    for doc_id, (resp,) in answers:
        taught = dict(worker.QA)[questions[doc_id]]
        assert resp == taught


@pytest.mark.parametrize("tp", [1, 2])
def test_loglikelihoods_equal_hf(trained, tp):
    ours, ref = trained["ours"][tp], trained["ref"]
    assert len(ours["ll"]) == len(ref["ll"])
    for (lp, greedy), (ref_lp, ref_greedy) in zip(ours["ll"], ref["ll"]):
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy
    assert any(g for _, g in ref["ll"]) and not all(g for _, g in ref["ll"])
    assert ours["rolling"] == pytest.approx(ref["rolling"], abs=1e-4)


@pytest.mark.parametrize("tp", [1, 2])
def test_task_accuracies_equal_hf(trained, tp):
    ours, ref = trained["ours"][tp]["tasks"], trained["ref"]["tasks"]
    assert ours["samples"][lmw.GEN_TASK] == ref["samples"][lmw.GEN_TASK]
    mc, ref_mc = ours["samples"][lmw.MC_TASK], ref["samples"][lmw.MC_TASK]
    assert [d for d, _ in mc] == [d for d, _ in ref_mc]
    for (_, lls), (_, ref_lls) in zip(mc, ref_mc):
        assert lls == pytest.approx(ref_lls, abs=1e-4)
    for task in (lmw.GEN_TASK, lmw.MC_TASK):
        assert ours["metrics"][task] == pytest.approx(ref["metrics"][task], abs=1e-9)
    assert ours["metrics"][lmw.MC_TASK]["acc,none"] > 0.5


@pytest.mark.parametrize("tp", [1, 2])
def test_kv_cache_greedy_equals_no_cache_and_hf(trained, tp):
    ours = trained["ours"][tp]
    assert ours["cached"] == ours["uncached"] == ours["single"]
    assert ours["cached"] == trained["ref"]["hf_generate"]
    assert len({len(p) for p in ours["cached"]}) >= 1 and all(ours["cached"])


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
        "--lm-eval-tasks",
        lmw.GEN_TASK,
        "--lm-eval-include-path",
        trained["tasks"],
        "--output",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1")
    run = zygote.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "exact_match" in run.stdout and "ppl" in run.stdout
    report = json.load(open(out))
    lib = trained["report"]
    assert report["lm_eval"] == lib["lm_eval"]
    assert report["perplexity"][0]["tokens"] == lib["perplexity"][0]["tokens"]
    assert report["perplexity"][0]["perplexity"] == pytest.approx(
        lib["perplexity"][0]["perplexity"], rel=1e-5
    )


def test_lm_eval_cli_finds_megatron_slm(trained, tmp_path):
    """The installed ``lm_eval`` command resolves ``--model megatron-slm`` (through the .pth
    hook) and sets up its own process group."""
    _lm_eval_cli_mc_accuracy(
        trained, tmp_path / "out", "megatron-slm", f"load={trained['root'] / 'qa_ckpt'}"
    )


def _lm_eval_cli_mc_accuracy(trained, out, model: str, model_args: str) -> None:
    """The installed ``lm_eval`` command with ``--model model`` gives the in-process adapter's
    accuracy on the multiple-choice task."""
    exe = shutil.which("lm_eval", path=os.path.dirname(sys.executable))
    assert exe, "lm-eval's console script is not installed next to this interpreter"
    cmd = [
        sys.executable, exe, "--model", model, "--model_args", model_args, "--tasks", lmw.MC_TASK,
        "--include_path", trained["tasks"], "--output_path", str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1")
    run = zygote.run(cmd, capture_output=True, text=True, cwd=str(out.parent), env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    (result_file,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    results = json.load(open(result_file))["results"][lmw.MC_TASK]
    assert results["acc,none"] == pytest.approx(
        trained["ours"][1]["tasks"]["metrics"][lmw.MC_TASK]["acc,none"]
    )


# ---- Rho-1's tool-integrated (ToRA) tasks on the tiny checkpoint ---------------------------
TORA_GSM8K = [
    {"question": "what color is grass?", "answer": "green\n#### 3"},
    {"question": "Tom has 2 apples and buys 3 more. How many now?", "answer": "2+3\n#### 5"},
]
TORA_MATH = [{"problem": "Compute $1 + 1$.", "solution": "It is $\\boxed{2}$."}]


def _tora_data(root) -> dict:
    paths = {
        "gsm8k_path": str(root / "tora_gsm8k.jsonl"),
        "math_path": str(root / "tora_math.jsonl"),
    }
    for key, rows in (("gsm8k_path", TORA_GSM8K), ("math_path", TORA_MATH)):
        with open(paths[key], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return paths


def tora_worker(rank, world, root, metadata):
    """The tool-integrated prompts through our adapter without and with tool rounds, and through
    lm-eval's ``hf`` model on the export; the library run of the ``rho1_math_tora`` tag."""
    import re

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from megatron_slm.evaluation import load_eval_model
    from megatron_slm.evaluation.harness import run_lm_eval
    from megatron_slm.evaluation.lm_eval_model import MegatronSLMLM
    from megatron_slm.evaluation.tasks import TASKS_DIR, utils
    from megatron_slm.launch import initialize

    m = load_eval_model(os.path.join(root, "qa_ckpt"), initialize(device="cpu"))
    with open(os.path.join(TASKS_DIR, "gsm8k_rho1_tora.yaml")) as f:
        until = json.loads(re.search(r"until: (\[.*\])", f.read()).group(1))
    plain = {"until": until, "do_sample": False, "max_gen_toks": 24}

    # The ToRA prompts (unknown words to this model) and QA prompts it answers at length.
    prompts = [utils.gsm8k_tora_prompt(d) for d in TORA_GSM8K]
    shots = worker.QA[: worker.NUM_SHOTS]
    prompts += [worker.qa_prompt(q, shots) for q, _ in worker.QA[worker.NUM_SHOTS :][:3]]

    def requests(kwargs):
        return [Instance("generate_until", {}, (p, kwargs), i) for i, p in enumerate(prompts)]

    ours = MegatronSLMLM(model=m, batch_size=2)
    hf = HFLM(pretrained=os.path.join(root, "qa_hf"), device="cpu", dtype="float32", batch_size=1)
    out = {
        "ours": ours.generate_until(requests(plain)),
        "tool": ours.generate_until(requests(dict(plain, tool_rounds=4))),
        "hf": hf.generate_until(requests(plain)),
    }
    res = run_lm_eval(m, ["rho1_math_tora"], metadata=metadata, batch_size=2, log_samples=True)
    out["results"] = {t: res["results"][t] for t in ("gsm8k_rho1_tora", "math_rho1_tora")}
    out["resps"] = {t: [s["resps"][0][0] for s in res["samples"][t]] for t in out["results"]}
    return json.loads(json.dumps(out, default=float))


@pytest.fixture(scope="module")
def tora(trained):
    metadata = _tora_data(trained["root"])
    (out,) = run_distributed(tora_worker, 1, str(trained["root"]), metadata)
    return dict(out, metadata=metadata)


def test_tora_first_round_equals_hf_and_starts_the_completion(trained, tora):
    """The non-tool part: a round is a plain greedy generation, equal to lm-eval's hf model on
    the export; with tool rounds on, the completion starts with exactly that round."""
    assert tora["ours"] == tora["hf"] and sum(map(bool, tora["ours"])) >= 3
    for plain, tool in zip(tora["ours"], tora["tool"]):
        assert tool.startswith(plain.rstrip())
        if "```output" not in tool:  # no program asked for: the completion is that one round
            assert tool == plain.rstrip()


def test_tora_tasks_through_evaluate_cli_and_lm_eval_cli(trained, tora, tmp_path):
    from megatron_slm.evaluation.tasks import TASKS_DIR, utils

    results = tora["results"]
    for task, docs, prompt in (
        ("gsm8k_rho1_tora", TORA_GSM8K, utils.gsm8k_tora_prompt),
        ("math_rho1_tora", TORA_MATH, utils.math_tora_prompt),
    ):
        resps = tora["resps"][task]
        assert len(resps) == len(docs)
        graded = [utils.process_results(d, [r])["exact_match"] for d, r in zip(docs, resps)]
        assert results[task]["exact_match,none"] == pytest.approx(sum(graded) / len(docs))
        assert all(prompt(d).endswith("\n\nSolution:\n") for d in docs)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1")
    load = str(trained["root"] / "qa_ckpt")
    out = tmp_path / "report.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load", load]
    cmd += ["--device", "cpu", "--lm-eval-tasks", "rho1_math_tora", "--micro-batch-size", "2"]
    cmd += ["--lm-eval-metadata", json.dumps(tora["metadata"]), "--output", str(out)]
    run = zygote.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.load(open(out))["lm_eval"]
    for task, metrics in results.items():
        assert report[task]["exact_match,none"] == pytest.approx(metrics["exact_match,none"])

    exe = shutil.which("lm_eval", path=os.path.dirname(sys.executable))
    cmd = [sys.executable, exe, "--model", "megatron-slm", "--model_args", f"load={load}"]
    cmd += ["--batch_size", "2"]
    cmd += ["--tasks", "gsm8k_rho1_tora", "--include_path", TASKS_DIR]
    cmd += ["--metadata", json.dumps(tora["metadata"]), "--output_path", str(tmp_path / "out")]
    run = zygote.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    (result_file,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    cli = json.load(open(result_file))["results"]["gsm8k_rho1_tora"]
    assert cli["exact_match,none"] == pytest.approx(results["gsm8k_rho1_tora"]["exact_match,none"])


def tp_programs_worker(rank, world):
    """``_run_programs`` under TP=2: a program whose output differs on every run (os.urandom)
    runs once, on the first TP rank, and both ranks get its result."""
    from types import SimpleNamespace

    from megatron_slm.evaluation.lm_eval_model import MegatronSLMLM
    from megatron_slm.evaluation.sandbox import Sandbox, SandboxLimits
    from megatron_slm.launch import initialize

    initialize(device="cpu", tensor_model_parallel_size=2)
    box = Sandbox(SandboxLimits(wall_seconds=5.0))
    fake = SimpleNamespace(_sandbox=lambda: box)
    results = MegatronSLMLM._run_programs(fake, ["import os\nprint(os.urandom(8).hex())"] * 2)
    return [(r.status, r.stdout) for r in results]


def test_tool_results_are_the_first_tp_rank_s():
    first, second = run_distributed(tp_programs_worker, 2)
    assert first == second
    (status_a, out_a), (status_b, out_b) = first
    assert status_a == status_b == "ok" and out_a != out_b  # two runs, one per program


# ---- the text generation server (tools/run_text_generation_server.py) ----------------------
def _qa_texts() -> list[str]:
    """The texts of ``lmw.prompts_of`` (QA questions with 0, 1 and 2 shots)."""
    return [
        worker.qa_prompt(q, worker.QA[: k % (worker.NUM_SHOTS + 1)])
        for k, (q, _) in enumerate(worker.QA[worker.NUM_SHOTS :])
    ]


def _hf_log_probs(trained, ids: list[int]):
    """``transformers`` on the export: log-softmax at each position of ``ids``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(trained["root"] / "qa_hf"))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_generation_server_tp2(trained, tmp_path):
    """The server at TP=2 under torchrun: Megatron-LM's ``/api`` decodes greedily what
    ``transformers`` does; OpenAI's ``/v1/completions`` gives HF's log probabilities, stops at a
    stop string, samples reproducibly inside top-k; chat completions render the tokenizer's
    template; ProX's OpenAI clients (4 requests in flight) and lm-eval's ``local-completions``
    model get the in-process answers and accuracy through it; bad requests get 400; Megatron-LM's
    CLI client talks to it; SIGTERM stops it."""
    import torch

    from tests.functional.server_client import Server

    texts, ref = _qa_texts(), trained["ref"]["hf_generate"]
    with Server(str(trained["root"] / "qa_ckpt"), 2, tmp_path, "--micro-batch-size", "2") as s:
        # greedy (top_k 1) in micro-batches of 2 prompts of different lengths = HF generate
        out = s.put("/api", {"prompts": texts, "tokens_to_generate": 12, "top_k": 1})
        for text, tokens, full, gen in zip(texts, out["tokens"], out["text"], ref):
            assert tokens[-len(gen) :] == gen and full.startswith(text)
        # log probabilities of prompt + generation = HF's, and the greedy flags lm-eval reads
        seqs, wants = out["tokens"][:2], []
        body = {"prompt": seqs, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        for seq, choice in zip(seqs, s.post("/v1/completions", body)["choices"]):
            lp = choice["logprobs"]
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            hf = _hf_log_probs(trained, seq)
            want = hf[:-1].gather(-1, torch.tensor(seq[1:])[:, None])[:, 0].tolist()
            assert lp["token_logprobs"][1 : len(seq)] == pytest.approx(want, abs=1e-4)
            wants.append(want)
            for i in range(1, len(seq)):
                (best,) = lp["top_logprobs"][i].values()
                assert best == pytest.approx(float(hf[i - 1].max()), abs=1e-4)
        # echo alone (no new token), beside a one-token prompt that has nothing to score
        body = {"prompt": [seqs[0][:1], seqs[0]], "max_tokens": 0, "echo": True, "logprobs": 1}
        one, whole = (c["logprobs"] for c in s.post("/v1/completions", body)["choices"])
        assert one["token_logprobs"] == one["top_logprobs"] == [None]
        assert whole["token_logprobs"][1:] == pytest.approx(wants[0], abs=1e-4)
        # stop strings end the completion and are cut from its text
        answer = out["text"][0][len(texts[0]) :]
        body = {"prompt": texts[0], "max_tokens": 12, "temperature": 0, "stop": ["\n"]}
        (choice,) = s.post("/v1/completions", body)["choices"]
        assert "\n" in answer and choice["text"] == answer.split("\n")[0]
        assert choice["finish_reason"] == "stop"
        # chat: the tokenizer's template, then the same greedy decoding as a completion of its ids
        messages = [{"role": "user", "content": "what color is grass?"}]
        body = {"messages": messages, "temperature": 0, "max_tokens": 8}
        (chat,) = s.post("/v1/chat/completions", body)["choices"]
        ids = hf_tokenizer(trained).apply_chat_template(messages, add_generation_prompt=True)
        body = {"prompt": ids, "max_tokens": 8, "temperature": 0}
        (plain,) = s.post("/v1/completions", body)["choices"]
        assert chat["message"] == {"role": "assistant", "content": plain["text"]}
        assert chat["finish_reason"] == plain["finish_reason"]
        # the ProX clients (refining backend, annotation teacher), 4 requests in flight at once
        _prox_clients_through_server(s.url, texts, out["text"], messages, chat)
        # sampling: the same seed gives the same text; every drawn token is in HF's top 3
        body = {"prompts": texts[:3], "tokens_to_generate": 6, "top_k": 3, "temperature": 5.0,
                "random_seed": 5}  # fmt: skip
        first, again = s.put("/api", body), s.put("/api", body)
        assert first["tokens"] == again["tokens"]
        assert first["tokens"] != s.put("/api", {**body, "top_k": 1})["tokens"]
        for tokens, prompt in zip(first["tokens"], lmw_prompts(trained)):
            hf = _hf_log_probs(trained, tokens)
            for i in range(len(prompt), len(tokens)):
                assert tokens[i] in hf[i - 1].topk(3).indices.tolist()
        # lm-eval's OpenAI-completions model against the server = the in-process adapter
        _lm_eval_through_server(trained, tmp_path, s)
        # refusals: one message, status 400 / 404
        status, err = s.request("PUT", "/api", {"prompts": ["a"], "top_k": 2, "top_p": 0.5})
        assert status == 400 and err["message"] == "cannot set both top-k and top-p samplings."
        assert s.request("GET", "/nowhere")[0] == 404
        assert s.request("GET", "/health") == (200, {"status": "ok"})
        # Megatron-LM's interactive client
        cli = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "text_generation_cli.py"),
             "--server", s.url.removeprefix("http://")],
            input="Question: what color is grass?\n3\n", capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert cli.returncode == 0
        assert "Megatron Response: \nQuestion: what color is grass?" in cli.stdout
        s.stop()
    log = s.log()  # rank 0 left its loop on SIGTERM and stopped the other rank: no rank failed
    assert "server stopped" in log and "[rank0]:" not in log and "[rank1]:" not in log


def _prox_clients_through_server(url, texts, greedy_texts, messages, chat):
    from megatron_slm.refine.teachers import OpenAICompletions, OpenAITeacher

    answers = {}

    def keep(key, answer, error):
        answers[key] = (answer, error)

    refiner = OpenAICompletions(url + "/v1", "qa", concurrency=4, max_retries=0)
    refiner.answer_all(list(enumerate(texts)), 12, keep)
    for i, (text, full) in enumerate(zip(texts, greedy_texts)):
        assert answers[i] == (full[len(text) :], None)
    teacher = OpenAITeacher(url + "/v1", "qa", concurrency=2, max_retries=0)
    teacher.answer_all([("chat", messages)], 8, keep)
    assert answers["chat"] == (chat["message"]["content"], None)


def hf_tokenizer(trained):
    from megatron_slm.data.tokenizer import build_tokenizer

    return build_tokenizer("HuggingFaceTokenizer", str(trained["root"] / "tokenizer"))


def lmw_prompts(trained) -> list[list[int]]:
    return lmw.prompts_of(hf_tokenizer(trained))


def _lm_eval_through_server(trained, tmp_path, server):
    """lm-eval's ``local-completions`` with its default tokenizer backend, which finds the
    server's tokenizer endpoints; they encode as the Hugging Face tokenizer does."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(trained["root"] / "tokenizer"))
    for text in ("Question: what color is grass?\nAnswer: green", "</s>"):
        body = {"prompt": text, "add_special_tokens": False}
        assert server.post("/tokenize", body)["tokens"] == hf.encode(text, add_special_tokens=False)
    ids = hf.encode("Answer: green")
    assert server.post("/detokenize", {"tokens": ids})["prompt"] == hf.decode(ids)
    model_args = f"base_url={server.url}/v1/completions,model=qa,max_retries=1"
    _lm_eval_cli_mc_accuracy(trained, tmp_path / "api_out", "local-completions", model_args)
