"""The annotation run's inputs, teacher prompts and answer journal (what a rerun resumes from)."""

from __future__ import annotations

import glob
import hashlib
import json
import os

from megatron_slm.atomic_io import write_text_atomic
from megatron_slm.data.jsonl import iter_jsonl
from megatron_slm.refine.annotate_config import AnnotateError

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
PROMPT_FILES = {"edu": "doc_edu.txt", "format": "doc_format.txt", "chunk": "chunk_program.txt"}
PLACEHOLDER = {"edu": "{document}", "format": "{document}", "chunk": "{chunk}"}
JOURNAL_FORMAT = "megatron-slm-prox-annotate-journal"
KILL_HOOK_ENV = "MEGATRON_SLM_ANNOTATE_KILL_AT"
"""Test hook: ``answer:<k>`` SIGKILLs the run right after the k-th answer is journaled."""


def read_documents(patterns: list[str], text_key: str) -> list[tuple[str, dict, str]]:
    """``(source "path:line", record, text)`` of every document, in input order."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise AnnotateError(f"--input {pattern!r}: no such file")
        paths.extend(m for m in matches if m not in paths)
    docs = []
    for path in paths:
        try:
            for line_no, record in iter_jsonl(path):
                text = record.get(text_key)
                if not isinstance(text, str):
                    what = "no" if text_key not in record else "a non-string"
                    raise AnnotateError(f"{path}:{line_no}: {what} {text_key!r} key (--text-key)")
                docs.append((f"{path}:{line_no}", record, text))
        except UnicodeDecodeError as e:
            raise AnnotateError(f"{path}: not UTF-8 text ({e})") from None
        except AnnotateError:
            raise
        except ValueError as e:  # iter_jsonl names the file and line
            raise AnnotateError(str(e)) from None
    return docs


def load_prompts(prompts_dir: str | None, stage: str) -> dict[str, str]:
    root = prompts_dir or PROMPTS_DIR
    names = ("edu", "format") if stage == "doc" else ("chunk",)
    prompts = {}
    for name in names:
        path = os.path.join(root, PROMPT_FILES[name])
        try:
            with open(path, encoding="utf-8") as f:
                prompts[name] = f.read()
        except OSError as e:
            raise AnnotateError(f"--prompts-dir: cannot read {path} ({e.strerror})") from None
        if PLACEHOLDER[name] not in prompts[name]:
            raise AnnotateError(f"--prompts-dir: {path} has no {PLACEHOLDER[name]} placeholder")
    return prompts


def teacher_messages(template: str, name: str, content: str) -> list[dict]:
    return [{"role": "user", "content": template.replace(PLACEHOLDER[name], content)}]


def request_key(messages: list[dict], max_new_tokens: int) -> str:
    blob = json.dumps([messages, max_new_tokens], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class Journal:
    """Append-only answers: ``{"key", "answer", "error"}`` per line, fsync'd; the first line is the
    run's manifest."""

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.answers: dict[str, tuple[str | None, str | None]] = {}
        if os.path.exists(path):
            self._load(manifest)
            self.f = open(path, "a", encoding="utf-8")
        else:  # the manifest line appears whole or not at all (unique temporary, fsync, rename)
            write_text_atomic(path, json.dumps(manifest, sort_keys=True) + "\n")
            self.f = open(path, "a", encoding="utf-8")

    def _load(self, manifest: dict) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        good = len(data)
        if lines[-1]:  # a torn last line from a killed run: cut it off
            good = len(data) - len(lines[-1])
            lines = lines[:-1]
        try:
            head = json.loads(lines[0])
        except (IndexError, ValueError):
            raise AnnotateError(f"--output: {self.path} is not a journal; delete it") from None
        if head != manifest:
            keys = sorted(k for k in set(head) | set(manifest) if head.get(k) != manifest.get(k))
            raise AnnotateError(
                f"--output: {self.path} is another run's journal (differs in: {', '.join(keys)}); "
                f"use another --output or delete it"
            )
        for i, line in enumerate(lines[1:], 2):
            if not line:
                continue
            try:
                entry = json.loads(line)
                self.answers[entry["key"]] = (entry["answer"], entry["error"])
            except (ValueError, KeyError, TypeError):
                raise AnnotateError(f"{self.path}:{i}: corrupt journal line; delete it") from None
        if good != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def add(self, key: str, answer: str | None, error: str | None) -> None:
        self.f.write(json.dumps({"key": key, "answer": answer, "error": error}) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.answers[key] = (answer, error)

    def close(self) -> None:
        self.f.close()
