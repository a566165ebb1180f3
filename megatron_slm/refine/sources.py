"""Where a document's programs come from: a programs file (``apply`` mode) or the refining models
(model mode: prompts, generation through a backend, the per-shard answer journal)."""

from __future__ import annotations

import json
import os

from megatron_slm.refine.config import ApplyConfig, ModelConfig
from megatron_slm.refine.decision import Document, Outcome, RefineError, decide, read_jsonl_records
from megatron_slm.refine.executor import (
    AcceptanceRule,
    execute_doc_program,
)


def _id_key(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


class ProgramFile:
    """The programs of a ``--programs`` JSONL file (``{id, doc_program?, chunk_program?}`` per
    line, each program a string or null), by document id: the one reader of this format, for
    ``tools/prox_refine.py apply`` and ``tools/prox_annotate.py --programs``."""

    def __init__(self, path: str, id_key: str):
        self.path, self.id_key = path, id_key
        if not os.path.isfile(path):
            raise RefineError(f"--programs {path}: no such file")
        self.programs: dict[str, tuple[str | None, str | None]] = {}
        first_line: dict[str, int] = {}
        for line_no, record in read_jsonl_records(path):
            if id_key not in record:
                raise RefineError(f"{path}:{line_no}: no {id_key!r} key (--id-key)")
            key = _id_key(record[id_key])
            if key in first_line:
                raise RefineError(
                    f"{path}:{line_no}: duplicate {id_key} {key} (first at line {first_line[key]})"
                )
            programs = []
            for name in ("doc_program", "chunk_program"):
                value = record.get(name)
                if value is not None and not isinstance(value, str):
                    raise RefineError(f"{path}:{line_no}: {name!r} must be a string or null")
                programs.append(value)
            first_line[key] = line_no
            self.programs[key] = (programs[0], programs[1])

    def lookup(self, record: dict, where: str) -> tuple[str | None, str | None]:
        """``(doc_program, chunk_program)`` of the input document ``record``; ``where`` ("path:line"
        of the document) names it in the error when it has no id or no program."""
        if self.id_key not in record:
            raise RefineError(f"{where}: no {self.id_key!r} key (--id-key)")
        key = _id_key(record[self.id_key])
        if key not in self.programs:
            raise RefineError(f"{where}: no program for {self.id_key} {key} in {self.path}")
        return self.programs[key]


class ProgramTable:
    """``apply`` mode: the programs of a JSONL file, by document id."""

    def __init__(self, config: ApplyConfig, rule: AcceptanceRule, semantics: str = "strict"):
        self.programs, self.rule = ProgramFile(config.programs, config.id_key), rule
        self.semantics = semantics
        self.tokenizer = None
        if config.tokenizer:
            from megatron_slm.refine.backends import BackendError, load_tokenizer

            try:
                self.tokenizer = load_tokenizer(
                    config.tokenizer,
                    "--tokenizer",
                    sentencepiece_ok=True,
                    trust_remote_code=config.trust_remote_code,
                )
            except BackendError as e:
                raise RefineError(str(e)) from None

    def refine(self, docs: list[Document]) -> list[Outcome]:
        return [
            decide(
                doc.text,
                *self.programs.lookup(doc.record, f"{doc.path}:{doc.line}"),
                self.rule,
                self.semantics,
            )
            for doc in docs
        ]


class ModelRefiner:
    """Model mode: generate the programs with the refining models, then execute them."""

    def __init__(self, config: ModelConfig, rule: AcceptanceRule, semantics: str = "strict"):
        self.config, self.rule, self.semantics = config, rule, semantics
        self._doc = self._chunk = None
        self._journal = None
        # fail early on a bad model directory (tokenizer / chat template), before any work
        from megatron_slm.refine.backends import BackendError, load_tokenizer

        try:
            trust = config.trust_remote_code
            if "doc" in config.stages:
                self.doc_tokenizer = load_tokenizer(config.doc_model, "--doc-model", False, trust)
            if "chunk" in config.stages:
                self.chunk_tokenizer = load_tokenizer(
                    config.chunk_model, "--chunk-model", False, trust
                )
        except BackendError as e:
            raise RefineError(str(e)) from None
        self.tokenizer = self.chunk_tokenizer if "chunk" in config.stages else self.doc_tokenizer

    def _generator(self, stage: str):
        from megatron_slm.refine.backends import BackendError, load_generator

        c = self.config
        attr = "_doc" if stage == "doc" else "_chunk"
        if getattr(self, attr) is None:
            other = self._chunk if stage == "doc" else self._doc
            if other is not None and (c.doc_model == c.chunk_model):
                setattr(self, attr, other)  # one model for both stages: load it once
            else:
                try:
                    gen = load_generator(c, stage)
                except BackendError as e:
                    raise RefineError(str(e)) from None
                setattr(self, attr, gen)
        gen = getattr(self, attr)
        if hasattr(gen, "journal"):
            gen.journal = self._journal
        return gen

    @property
    def journaled(self) -> bool:
        """The server's answers are journaled per shard (``--backend openai``)."""
        return self.config.backend == "openai"

    def use_journal(self, path: str | None) -> None:
        """Journal the server's answers to ``path`` (None: stop)."""
        from megatron_slm.refine.journal import Journal, JournalError

        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if path is not None:
            try:
                self._journal = Journal(path)
            except JournalError as e:
                raise RefineError(str(e)) from None

    def _generate(self, stage: str, prompts: list, max_new_tokens: int) -> list[str]:
        from megatron_slm.refine.backends import BackendError

        try:
            return self._generator(stage).generate(prompts, max_new_tokens)
        except BackendError as e:
            raise RefineError(str(e)) from None

    def _doc_prompt(self, text: str):
        """``(prompt, truncated)``: text (strict) or ProX's token ids (prox)."""
        from megatron_slm.refine.prompts import PromptError, doc_prompt, prox_doc_prompt_ids

        c = self.config
        if self.semantics == "prox":
            return prox_doc_prompt_ids(
                self.doc_tokenizer, text, c.doc_max_prompt_tokens, c.doc_template
            )
        try:
            return doc_prompt(self.doc_tokenizer, text, c.doc_max_prompt_tokens, c.doc_template)
        except PromptError as e:
            raise RefineError(f"--doc-model {c.doc_model}: {e}") from None

    def _chunks(self, text: str):
        """``(chunk prompts, long lines)`` of one document."""
        from megatron_slm.refine.chunking import split_into_chunks, wrap_chunk
        from megatron_slm.refine.prompts import (
            chunk_prompt,
            prox_chunk_prompt_ids,
            prox_count_line_tokens,
        )

        c, tok = self.config, self.chunk_tokenizer
        prox = self.semantics == "prox"

        def count(lines):
            if prox:
                return prox_count_line_tokens(tok, lines)
            return [len(ids) for ids in tok(lines, add_special_tokens=False)["input_ids"]]

        chunks, long_lines = split_into_chunks(
            text, count, c.chunk_max_tokens, c.line_prefix, send_long_lines=prox
        )
        render = prox_chunk_prompt_ids if prox else chunk_prompt
        return [render(tok, wrap_chunk(chunk.body)) for chunk in chunks], long_lines

    def refine(self, docs: list[Document]) -> list[Outcome]:
        c = self.config
        live = [i for i, d in enumerate(docs) if d.text.split()]
        doc_programs: dict[int, str] = {}
        truncated: dict[int, bool] = {}
        if "doc" in c.stages and live:
            prompts = []
            for i in live:
                prompt, truncated[i] = self._doc_prompt(docs[i].text)
                prompts.append(prompt)
            outputs = self._generate("doc", prompts, c.doc_max_new_tokens)
            doc_programs = dict(zip(live, outputs))
        chunk_programs: dict[int, str] = {}
        long_lines: dict[int, list[int]] = {}
        if "chunk" in c.stages:
            keep = [
                i
                for i in live
                if i not in doc_programs
                or not execute_doc_program(doc_programs[i], self.semantics).dropped
            ]
            prompts, owners = [], []
            for i in keep:
                chunk_prompts, long_lines[i] = self._chunks(docs[i].text)
                prompts.extend(chunk_prompts)
                owners.extend([i] * len(chunk_prompts))
            outputs = self._generate("chunk", prompts, c.chunk_max_new_tokens) if prompts else []
            parts: dict[int, list[str]] = {i: [] for i in keep}
            for i, out in zip(owners, outputs):
                parts[i].append(out)
            chunk_programs = {i: "\n".join(p) for i, p in parts.items()}
        outcomes = []
        for i, doc in enumerate(docs):
            outcome = decide(
                doc.text, doc_programs.get(i), chunk_programs.get(i), self.rule, self.semantics
            )
            if "doc" in c.stages:
                outcome.extra["doc_prompt_truncated"] = truncated.get(i, False)
            if "chunk" in c.stages:
                outcome.extra["long_lines"] = long_lines.get(i, [])
            outcomes.append(outcome)
        return outcomes
