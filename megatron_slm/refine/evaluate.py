"""Program-quality evaluation behind ``tools/prox_eval.py``: a refining model writes programs for
held-out seed examples (the ``tools/prox_annotate.py`` format) and is scored against their reference
programs with :mod:`megatron_slm.refine.metrics`.

The model is prompted exactly as ``tools/prox_refine.py`` prompts it (``prompts.chat_prompt`` of the
example's user message, greedy decoding); an example's stage is its ``metadata.stage``, else chunk
when the user message is a ``[doc]...[/doc]`` chunk, else doc.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from megatron_slm.atomic_io import write_json_atomic, write_jsonl_atomic
from megatron_slm.cli import arg
from megatron_slm.data.jsonl import iter_jsonl
from megatron_slm.errors import ConfigError, UserError
from megatron_slm.refine.metrics import Scores
from megatron_slm.remote_code import RemoteCodeArgs


class EvalError(UserError):
    """Bad input; the message names the flag or the file and line."""


@dataclass
class EvalConfig(RemoteCodeArgs):
    model: str = arg(None, "Refining model (Hugging Face directory).", required=True)
    data: str = arg(
        None, "Held-out seeds JSONL: {'messages': [system, user, assistant]}.", required=True
    )
    output: str | None = arg(None, "JSON report path (default: printed to stdout).")
    predictions: str | None = arg(
        None,
        "Also write every example's program next to the reference (JSONL: stage, user, "
        "reference, prediction), to see what the model gets wrong.",
    )
    device: str = arg("auto", "auto, cpu, cuda, cuda:N.")
    dtype: str = arg("auto", "Model dtype.", choices=["auto", "float32", "bfloat16", "float16"])
    batch_size: int = arg(32, "Prompts per generate call.")
    doc_max_new_tokens: int = arg(2000, "As tools/prox_refine.py.")
    chunk_max_new_tokens: int = arg(256, "As tools/prox_refine.py.")

    def __post_init__(self):
        for name in ("batch_size", "doc_max_new_tokens", "chunk_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")


@dataclass
class Example:
    stage: str
    user: str
    reference: str


def example_stage(record: dict, user: str) -> str:
    stage = (record.get("metadata") or {}).get("stage") if isinstance(record, dict) else None
    if stage in ("doc", "chunk"):
        return stage
    return "chunk" if user.startswith("[doc]\n") and user.endswith("\n[/doc]") else "doc"


def read_examples(path: str) -> list[Example]:
    if not os.path.isfile(path):
        raise EvalError(f"--data {path}: no such file")
    examples = []
    try:
        for line_no, record in iter_jsonl(path):
            messages = record.get("messages")
            roles = [m.get("role") for m in messages] if isinstance(messages, list) else None
            if not roles or not all(isinstance(m.get("content"), str) for m in messages):
                raise EvalError(f"{path}:{line_no}: no 'messages' list of {{role, content}}")
            if "user" not in roles or roles[-1] != "assistant":
                raise EvalError(
                    f"{path}:{line_no}: 'messages' needs a user message and the reference "
                    f"program as the last (assistant) message"
                )
            user = messages[roles.index("user")]["content"]
            examples.append(Example(example_stage(record, user), user, messages[-1]["content"]))
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text ({e})") from None
    except EvalError:
        raise
    except ValueError as e:
        raise EvalError(str(e)) from None
    if not examples:
        raise EvalError(f"--data {path}: no examples")
    return examples


def score(examples: list[Example], predictions: list[str]) -> dict:
    scores = Scores()
    for ex, pred in zip(examples, predictions):
        if ex.stage == "doc":
            scores.add_doc(pred, ex.reference)
        else:
            scores.add_chunk(ex.user, pred, ex.reference)
    return scores.report()


def evaluate(config: EvalConfig, log=print) -> dict:
    from megatron_slm.refine.backends import BackendError, TransformersGenerator
    from megatron_slm.refine.prompts import chat_prompt

    examples = read_examples(config.data)
    try:
        gen = TransformersGenerator(
            config.model,
            "--model",
            config.device,
            config.dtype,
            config.batch_size,
            config.trust_remote_code,
        )
    except BackendError as e:
        raise EvalError(str(e)) from None
    predictions = [""] * len(examples)
    for stage, limit in (
        ("doc", config.doc_max_new_tokens),
        ("chunk", config.chunk_max_new_tokens),
    ):
        idx = [i for i, ex in enumerate(examples) if ex.stage == stage]
        if idx:
            prompts = [chat_prompt(gen.tokenizer, examples[i].user) for i in idx]
            for i, out in zip(idx, gen.generate(prompts, limit)):
                predictions[i] = out
    report = score(examples, predictions)
    if config.predictions:
        rows = (
            {"stage": ex.stage, "user": ex.user, "reference": ex.reference, "prediction": pred}
            for ex, pred in zip(examples, predictions)
        )
        write_jsonl_atomic(config.predictions, rows)
    report["model"] = os.path.abspath(config.model)
    report["data"] = os.path.abspath(config.data)
    if config.output:
        write_json_atomic(config.output, report)
    log(format_summary(report))
    return report


def format_summary(report: dict) -> str:
    ex = report["examples"]
    lines = [f"prox_eval: {ex['doc']} document and {ex['chunk']} chunk examples"]
    if "doc_drop" in report:
        d = report["doc_drop"]
        lines.append(
            f"  document drop: P {100 * d['precision']:.1f} R {100 * d['recall']:.1f} "
            f"F1 {100 * d['f1']:.1f} (accuracy {100 * d['accuracy']:.1f})"
        )
    if "chunk_lines" in report:
        c = report["chunk_lines"]
        em = report["normalize_exact_match"]
        lines.append(
            f"  chunk line removal: P {100 * c['precision']:.1f} R {100 * c['recall']:.1f} "
            f"F1 {100 * c['f1']:.1f}; normalize exact match "
            + ("n/a" if em is None else f"{100 * em:.1f}")
            + f" ({report['normalize_compared']} chunks)"
        )
    lines.append(f"  program error rate {100 * report['program_error_rate']:.1f}%")
    return "\n".join(lines)


def dumps(report: dict) -> str:
    return json.dumps(report, indent=1, sort_keys=True)
