"""Few-shot question answering with greedy decoding and exact match.

Data: JSONL records with ``question`` and ``answer``. The prompt of an example is ``k`` solved
shots followed by the question::

    <template(shot 1)><answer_template(shot 1)><shot_separator> ... <template(question)>

Shots come from a separate JSONL (``shots_path``) or, by default, the first ``k`` records of the
evaluation file, which are then not evaluated. The model continues greedily until EOD, a stop
string or ``max_new_tokens``; the continuation is cut at the first stop string; an extraction rule
turns it into the predicted answer; the gold answer goes through ``gold_extraction``; both are
normalised (whitespace collapsed, optionally lower-cased) and compared exactly.

Extraction rules: ``first-line`` (the first non-empty line), ``strip`` (the whole text),
``last-number`` (the last number, commas removed: GSM8K style), ``first-number``,
``regex:<pattern>`` (the first group of the first match, or the whole match).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from megatron_slm.cli import arg
from megatron_slm.data.jsonl import iter_jsonl
from megatron_slm.errors import ConfigError, InputFileError
from megatron_slm.evaluation.generate import greedy_generate
from megatron_slm.runtime import LoadedModel

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


RULES = ("first-line", "strip", "last-number", "first-number", "regex:<pattern>")


@dataclass
class FewShotConfig:
    """Prompting, decoding and scoring settings; each field is a ``tools/evaluate.py`` flag.
    Templates, separators and stops accept shell escapes such as ``\\n``."""

    num_shots: int = arg(0, "Solved examples before each question.")
    prompt_template: str = arg("Question: {question}\nAnswer:", "Format of one question.")
    answer_template: str = arg(" {answer}", "Format of a shot's answer, after its prompt.")
    shot_separator: str = arg("\n\n", "Text between shots and before the question.")
    stop: list[str] = arg(["\n"], "The continuation is cut at the first of these.", nargs="*")
    max_new_tokens: int = arg(32, "Decoding budget per question.")
    answer_extraction: str = arg("first-line", f"Rule applied to the continuation: {RULES}.")
    gold_extraction: str = arg("strip", "Rule applied to the gold answer.")
    ignore_case: bool = arg(False, "Compare lower-cased.")
    limit: int | None = arg(None, "Evaluate at most this many questions per set.")
    fewshot_shots: str | None = arg(None, "JSONL of shots (default: the first k of each set).")

    def __post_init__(self):
        if self.num_shots < 0:
            raise ConfigError("--num-shots must be >= 0")
        if "{question}" not in self.prompt_template:
            raise ConfigError("--prompt-template must contain {question}")
        if "{answer}" not in self.answer_template:
            raise ConfigError("--answer-template must contain {answer}")
        check_rule(self.answer_extraction, "--answer-extraction")
        check_rule(self.gold_extraction, "--gold-extraction")


def check_rule(rule: str, flag: str) -> None:
    if rule.startswith("regex:"):
        try:
            re.compile(rule[len("regex:") :])
        except re.error as exc:
            raise ConfigError(f"{flag} {rule!r}: invalid regular expression: {exc}") from exc
    elif rule not in RULES:
        raise ConfigError(f"{flag} must be one of {', '.join(RULES)}, got {rule!r}")


def extract_answer(text: str, rule: str) -> str:
    """Apply an extraction rule (see the module docstring); ``""`` when nothing matches."""
    if rule == "strip":
        return text.strip()
    if rule == "first-line":
        for line in text.splitlines():
            if line.strip():
                return line.strip()
        return ""
    if rule in ("last-number", "first-number"):
        numbers = _NUMBER.findall(text)
        if not numbers:
            return ""
        number = numbers[-1] if rule == "last-number" else numbers[0]
        return number.replace(",", "").rstrip(".")
    if rule.startswith("regex:"):
        match = re.search(rule[len("regex:") :], text)
        if not match:
            return ""
        return (match.group(1) if match.groups() else match.group(0)).strip()
    raise ValueError(f"unknown answer extraction rule {rule!r}")


def normalize(text: str, ignore_case: bool = False) -> str:
    text = " ".join(text.split())
    return text.lower() if ignore_case else text


def read_qa(path: str) -> list[dict]:
    records = []
    for line_no, record in iter_jsonl(path):
        for key in ("question", "answer"):
            if key not in record:
                raise InputFileError(f"{path}:{line_no}: no {key!r} field")
        records.append(record)
    return records


def build_prompt(question: str, shots: Sequence[dict], cfg: FewShotConfig) -> str:
    parts = [
        cfg.prompt_template.format(question=s["question"])
        + cfg.answer_template.format(answer=s["answer"])
        for s in shots
    ]
    parts.append(cfg.prompt_template.format(question=question))
    return cfg.shot_separator.join(parts)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def evaluate_fewshot(
    m: LoadedModel,
    examples: Sequence[dict],
    cfg: FewShotConfig,
    shots: Sequence[dict] | None = None,
    name: str = "qa",
    path: str = "",
) -> dict:
    """Exact-match accuracy of greedy answers; a report with one record per question."""
    tok = m.tokenizer
    if tok is None:
        raise ConfigError(
            "few-shot evaluation needs a tokenizer (--tokenizer-type/--tokenizer-model)"
        )
    examples = list(examples)
    if shots is None:
        if cfg.num_shots >= len(examples):
            raise ConfigError(
                f"--num-shots {cfg.num_shots} leaves no question to evaluate in {path or name}"
            )
        shots, examples = examples[: cfg.num_shots], examples[cfg.num_shots :]
    else:
        if len(shots) < cfg.num_shots:
            raise ConfigError(f"only {len(shots)} shots available, --num-shots {cfg.num_shots}")
        shots = list(shots)[: cfg.num_shots]
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    stops = tuple(cfg.stop)
    eod = tok.eod
    records, correct = [], 0
    for ex in examples:
        prompt = build_prompt(ex["question"], shots, cfg)
        ids = tok.tokenize(prompt)

        def stop(new_ids):
            return cut_at_stop(tok.detokenize([i for i in new_ids if i != eod]), stops)[1]

        new = greedy_generate(m, ids, max_new_tokens=cfg.max_new_tokens, eod=eod, stop=stop)
        text = tok.detokenize([i for i in new if i != eod])
        continuation, _ = cut_at_stop(text, stops)
        predicted = normalize(extract_answer(continuation, cfg.answer_extraction), cfg.ignore_case)
        gold = normalize(extract_answer(str(ex["answer"]), cfg.gold_extraction), cfg.ignore_case)
        ok = predicted == gold and gold != ""
        correct += ok
        records.append(
            {
                "question": ex["question"],
                "gold": gold,
                "generated": continuation,
                "extracted": predicted,
                "correct": ok,
            }
        )
    n = len(records)
    return {
        "name": name,
        "path": path,
        "num_shots": cfg.num_shots,
        "questions": n,
        "correct": correct,
        "exact_match": correct / n if n else float("nan"),
        "settings": asdict(cfg),
        "examples": records,
    }
