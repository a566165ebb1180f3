"""One document: read from its JSONL shard, its programs run (``executor``), the decision and
the output record."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_slm.data.jsonl import iter_jsonl
from megatron_slm.errors import UserError
from megatron_slm.refine.executor import (
    DROP_DOC,
    DROP_EMPTY,
    DROPPED,
    KEEP_DOC,
    AcceptanceRule,
    execute_chunk_program,
    execute_doc_program,
)


class RefineError(UserError):
    """Bad input or settings; the message names the file and line or the flag."""


@dataclass
class Document:
    path: str
    line: int
    record: dict
    text: str


@dataclass
class Outcome:
    decision: str
    text: str
    doc_program: str | None = None
    chunk_program: str | None = None
    doc_errors: list = field(default_factory=list)
    chunk_errors: list = field(default_factory=list)
    lines_removed: int = 0
    normalizations: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def dropped(self) -> bool:
        return self.decision in DROPPED


def decide(
    text: str,
    doc_program: str | None,
    chunk_program: str | None,
    rule: AcceptanceRule,
    semantics: str = "strict",
) -> Outcome:
    """Run the document program, then (if kept) the chunk program with the acceptance rule."""
    if not text.split():  # ProX's own code divides by zero here
        return Outcome(DROP_EMPTY, text, doc_program, chunk_program)
    doc_errors = []
    if doc_program is not None:
        doc = execute_doc_program(doc_program, semantics)
        doc_errors = doc.errors
        if doc.dropped:
            return Outcome(DROP_DOC, text, doc_program, chunk_program, doc_errors)
    if chunk_program is None:
        return Outcome(KEEP_DOC, text, doc_program, None, doc_errors)
    chunk = execute_chunk_program(text, chunk_program, rule, semantics)
    return Outcome(
        chunk.decision,
        chunk.text,
        doc_program,
        chunk_program,
        doc_errors,
        chunk.errors,
        chunk.lines_removed,
        chunk.normalizations,
    )


def output_record(doc: Document, outcome: Outcome, text_key: str) -> dict:
    record = {k: v for k, v in doc.record.items() if k != text_key}
    record["text"] = outcome.text
    previous = record.get("metadata")
    # the input's own metadata is kept; a non-object one under "input_metadata"
    if isinstance(previous, dict):
        metadata = dict(previous)
    else:
        metadata = {} if previous is None else {"input_metadata": previous}
    metadata["raw_text"] = doc.text
    metadata["doc_program"] = outcome.doc_program
    metadata["chunk_program"] = outcome.chunk_program
    metadata["prox"] = {
        "decision": outcome.decision,
        "doc_errors": [[e.line, e.reason] for e in outcome.doc_errors],
        "chunk_errors": [[e.line, e.reason] for e in outcome.chunk_errors],
        "lines_removed": outcome.lines_removed,
        "normalizations": outcome.normalizations,
        **outcome.extra,
    }
    record["metadata"] = metadata
    return record


def read_jsonl_records(path: str):
    """(line number, record) of a JSONL input; errors are RefineErrors naming file and line."""
    try:
        yield from iter_jsonl(path)
    except UnicodeDecodeError as e:
        raise RefineError(f"{path}: not UTF-8 text ({e})") from None
    except ValueError as e:  # iter_jsonl's messages name the file and line
        raise RefineError(str(e)) from None


def read_documents(path: str, text_key: str):
    for line_no, record in read_jsonl_records(path):
        if text_key not in record:
            raise RefineError(f"{path}:{line_no}: no {text_key!r} key (--text-key)")
        text = record[text_key]
        if not isinstance(text, str):
            raise RefineError(f"{path}:{line_no}: {text_key!r} is not a string")
        yield Document(path, line_no, record, text)
