"""The answers of a refining server, journaled as they arrive (``--backend openai``).

One JSON line per answer, ``{"key", "answer"}``, flushed at once: a run killed at any moment (a
SIGKILL loses nothing the kernel has) and run again asks the server only what has no line yet. A
key is the hash of everything that determines the answer (served model, generation limit, prompt),
so a journal can never answer another request. A torn last line is cut off on load.
"""

from __future__ import annotations

import hashlib
import json
import os

from megatron_slm.crash_points import CrashPoints
from megatron_slm.errors import UserError

# the pipeline's test hook (pipeline.KILL_HOOK_ENV): "answer:<k>" kills after the k-th journaled
# answer
_crash = CrashPoints("MEGATRON_SLM_REFINE_KILL_AT")


class JournalError(UserError):
    pass


def request_key(model: str, max_new_tokens: int, prompt: str | list[int]) -> str:
    payload = json.dumps([model, max_new_tokens, prompt], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


class Journal:
    def __init__(self, path: str):
        self.path = path
        self.answers: dict[str, str] = {}
        if os.path.exists(path):
            self._load()
        self.f = open(path, "a", encoding="utf-8")

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        good = len(data) - len(lines[-1])  # a killed run's torn last line: cut off
        for i, line in enumerate(lines[:-1], 1):
            try:
                entry = json.loads(line)
                self.answers[entry["key"]] = entry["answer"]
            except (ValueError, KeyError, TypeError):
                raise JournalError(f"{self.path}:{i}: corrupt journal line; delete it") from None
        if good != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def add(self, key: str, answer: str) -> None:
        self.f.write(json.dumps({"key": key, "answer": answer}) + "\n")
        self.f.flush()
        self.answers[key] = answer
        _crash.reached("answer")

    def close(self) -> None:
        self.f.close()
