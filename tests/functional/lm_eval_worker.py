"""Worker functions of the lm-eval adapter tests (run in spawned gloo processes, see
tests/dist_helpers.py): the QA model of hf_worker through our ``megatron-slm`` lm-eval model at
TP=1/2, and its Hugging Face export through lm-eval's own ``hf`` model, the reference."""

from __future__ import annotations

import json
import os

import torch

from tests.functional import hf_worker as worker

GEN_TASK, MC_TASK = "tiny_qa_gen", "tiny_qa_mc"


def write_tasks(root: str, qa_path: str) -> str:
    """Two local lm-eval tasks on the QA set (the first NUM_SHOTS records are the shots): greedy
    generation scored by exact match, and multiple choice among all answers."""
    task_dir = os.path.join(root, "tasks")
    os.makedirs(task_dir, exist_ok=True)
    records = [json.loads(line) for line in open(qa_path)]
    shots, tests = records[: worker.NUM_SHOTS], records[worker.NUM_SHOTS :]
    choices = sorted({r["answer"] for r in records} | {a for _, a in worker.QA})
    files = {}
    for name, rows in (("shots", shots), ("test", tests)):
        files[name] = os.path.join(task_dir, f"{name}.jsonl")
        with open(files[name], "w") as f:
            for r in rows:
                row = dict(r, choices=choices, gold=choices.index(r["answer"]))
                f.write(json.dumps(row) + "\n")
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    train: {files["shots"]}
    test: {files["test"]}
training_split: train
test_split: test
fewshot_split: train
fewshot_config:
  sampler: first_n
num_fewshot: {worker.NUM_SHOTS}
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
fewshot_delimiter: "\\n\\n"
"""
    with open(os.path.join(task_dir, f"{GEN_TASK}.yaml"), "w") as f:
        f.write(
            f"task: {GEN_TASK}\n{common}output_type: generate_until\n"
            'doc_to_target: "{{answer}}"\n'
            "generation_kwargs:\n"
            '  until: ["\\n"]\n'
            "  do_sample: false\n"
            "  max_gen_toks: 8\n"
            "filter_list:\n"
            "  - name: strip\n"
            "    filter:\n"
            "      - function: remove_whitespace\n"
            "      - function: take_first\n"
            "metric_list:\n"
            "  - metric: exact_match\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n"
        )
    with open(os.path.join(task_dir, f"{MC_TASK}.yaml"), "w") as f:
        f.write(
            f"task: {MC_TASK}\n{common}output_type: multiple_choice\n"
            'doc_to_choice: "{{choices}}"\n'
            'doc_to_target: "{{gold}}"\n'
            "metric_list:\n"
            "  - metric: acc\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n"
        )
    return task_dir


def requests(tokenizer_dir: str):
    """loglikelihood requests (with an empty context) and loglikelihood_rolling strings."""
    ll = [(worker.qa_prompt(q, worker.QA[: worker.NUM_SHOTS]), f" {a}") for q, a in worker.QA]
    ll += [("Question: what color is the sky?\nAnswer:", " green"), ("", "the quick brown fox")]
    rolling = [worker.CORPUS[0], worker.CORPUS[4], "Question: " + worker.QA[3][0]]
    return ll, rolling


def _instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _evaluate(lm, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[GEN_TASK, MC_TASK],
        task_manager=TaskManager(include_path=task_dir, include_defaults=False),
        log_samples=True,
    )
    if out is None:  # LOCAL_RANK != 0 under TP
        return None
    # generation: the filtered answer; multiple choice: the loglikelihood of each choice
    samples = {
        t: [
            (
                s["doc_id"],
                [r[0] if isinstance(r, (list, tuple)) else r for r in s["filtered_resps"]],
            )
            for s in out["samples"][t]
        ]
        for t in out["samples"]
    }
    metrics = {t: {k: v for k, v in r.items() if k != "alias"} for t, r in out["results"].items()}
    return json.loads(json.dumps({"metrics": metrics, "samples": samples}, default=float))


def _run_lm(lm, task_dir, ll, rolling):
    return dict(
        ll=lm.loglikelihood(_instances("loglikelihood", ll)),
        rolling=lm.loglikelihood_rolling(
            _instances("loglikelihood_rolling", [(s,) for s in rolling])
        ),
        tasks=_evaluate(lm, task_dir),
    )


def prompts_of(tok) -> list[list[int]]:
    """Prompts of different lengths: QA questions with 0, 1 and 2 shots."""
    out = []
    for k, (q, _) in enumerate(worker.QA[worker.NUM_SHOTS :]):
        shots = worker.QA[: k % (worker.NUM_SHOTS + 1)]
        out.append(tok.tokenize(worker.qa_prompt(q, shots)))
    return out


def ours(rank, world, root, task_dir, tp):
    """Our adapter at TP=tp: requests, tasks; greedy decoding with and without the KV cache."""
    from megatron_slm.evaluation import load_eval_model
    from megatron_slm.evaluation.lm_eval_model import MegatronSLMLM
    from megatron_slm.launch import initialize
    from megatron_slm.runtime import greedy_generate

    m = load_eval_model(
        os.path.join(root, "qa_ckpt"), initialize(device="cpu", tensor_model_parallel_size=tp)
    )
    ll, rolling = requests(root)
    out = _run_lm(MegatronSLMLM(model=m, batch_size=3), task_dir, ll, rolling)
    prompts = prompts_of(m.tokenizer)
    eod = m.tokenizer.eod
    out["cached"] = greedy_generate(m, prompts, max_new_tokens=12, eod=eod)
    out["uncached"] = greedy_generate(m, prompts, max_new_tokens=12, eod=eod, use_cache=False)
    out["single"] = [greedy_generate(m, [p], max_new_tokens=12, eod=eod)[0] for p in prompts]
    return out if rank == 0 else None


def export_and_reference(rank, world, root, task_dir):
    """Export the QA checkpoint to Hugging Face (tokenizer copied beside it) and run lm-eval's
    ``hf`` model and ``transformers`` greedy ``generate`` on it."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_slm.convert import convert_megatron_to_hf
    from megatron_slm.data.tokenizer import build_tokenizer
    from megatron_slm.launch import initialize

    initialize(device="cpu")
    export = os.path.join(root, "qa_hf")
    convert_megatron_to_hf(os.path.join(root, "qa_ckpt"), export)
    AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer")).save_pretrained(export)
    ll, rolling = requests(root)
    out = _run_lm(
        HFLM(pretrained=export, device="cpu", dtype="float32", batch_size=1), task_dir, ll, rolling
    )
    tok = build_tokenizer("HuggingFaceTokenizer", os.path.join(root, "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    out["hf_generate"] = []
    for p in prompts_of(tok):
        gen = model.generate(
            torch.tensor([p]),
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=tok.eod,
            pad_token_id=tok.eod,
        )
        out["hf_generate"].append(gen[0, len(p) :].tolist())
    return out


def train_evaluate_and_compare(rank, world, root, tok_dir, task_dir, ppl_data, seq_length, steps):
    """One process for everything at TP=1 (process start-ups dominate these tests): train and
    evaluate the QA model, export it and run the references, then our adapter."""
    trained = worker.train_and_evaluate(
        rank, world, root, tok_dir, task_dir, ppl_data, seq_length, steps, [GEN_TASK]
    )
    ref = export_and_reference(rank, world, root, task_dir)
    return trained, ref, ours(rank, world, root, task_dir, 1)
