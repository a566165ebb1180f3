"""Datasets, prompts and scoring of megatron-slm's lm-eval tasks (loaded by lm-eval's
``!function utils.*`` from this directory; see ``__init__.py`` for the task list)."""

from __future__ import annotations

import os

from megatron_slm.evaluation.math_answer import extract_answer, is_equiv, normalize_answer

_HERE = os.path.dirname(os.path.abspath(__file__))


def _prompt(name: str) -> str:
    with open(os.path.join(_HERE, name), encoding="utf-8") as f:
        return f.read().strip() + "\n\n\n"


def _local_or_hub(path: str | None, hub: tuple, what: str):
    """A ``{"test": Dataset}`` from a local JSONL, else from the standard dataset."""
    import datasets

    if path:
        if not os.path.isfile(path):
            raise ValueError(f"{what}: no such file {path!r}")
        return datasets.load_dataset("json", data_files={"test": path})
    return datasets.DatasetDict({"test": hub[0](datasets)})


def load_gsm8k(gsm8k_path: str | None = None, **_):
    return _local_or_hub(
        gsm8k_path or os.environ.get("MEGATRON_SLM_GSM8K"),
        (lambda ds: ds.load_dataset("openai/gsm8k", "main", split="test"),),
        "gsm8k_path",
    )


MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


def load_math(math_path: str | None = None, **_):
    def hub(ds):
        parts = [
            ds.load_dataset("EleutherAI/hendrycks_math", s, split="test") for s in MATH_SUBJECTS
        ]
        return ds.concatenate_datasets(parts)

    return _local_or_hub(math_path or os.environ.get("MEGATRON_SLM_MATH"), (hub,), "math_path")


def load_qa(qa_path: str | None = None, **_):
    path = qa_path or os.environ.get("MEGATRON_SLM_QA")
    if not path:
        raise ValueError("qa_local needs a JSONL: --metadata '{\"qa_path\": FILE}'")
    return _local_or_hub(path, (None,), "qa_path")


def gsm8k_prompt(doc: dict) -> str:
    return _prompt("gsm8k_cot.txt") + f"Question: {doc['question']}\nAnswer:"


def math_prompt(doc: dict) -> str:
    return _prompt("math_cot.txt") + f"Question: {doc['problem']}\nAnswer:"


def _tora_prompt(shots: str, question: str) -> str:
    """math-evaluation-harness's ``tora`` layout: instructions, examples separated by ``---``,
    then ``Question: ...`` and ``Solution:`` on its own line."""
    header = _prompt("tora_header.txt").rstrip("\n")
    return f"{header}\n\n{_prompt(shots).rstrip()}\n\nQuestion: {question}\n\nSolution:\n"


def gsm8k_tora_prompt(doc: dict) -> str:
    return _tora_prompt("gsm8k_tora.txt", doc["question"])


def math_tora_prompt(doc: dict) -> str:
    return _tora_prompt("math_tora.txt", doc["problem"])


def gsm8k_gold(doc: dict) -> str:
    return normalize_answer(str(doc["answer"]).split("####")[-1])


def math_gold(doc: dict) -> str:
    return extract_answer(doc["solution"])


def qa_gold(doc: dict) -> str:
    return extract_answer(str(doc["answer"]))


def process_results(doc: dict, results: list[str]) -> dict:
    """exact_match of the extracted, normalised answer against the task's gold answer."""
    if "solution" in doc:
        gold = math_gold(doc)
    elif "####" in str(doc.get("answer", "")):
        gold = gsm8k_gold(doc)
    else:
        gold = qa_gold(doc)
    return {"exact_match": float(is_equiv(extract_answer(results[0]), gold))}
