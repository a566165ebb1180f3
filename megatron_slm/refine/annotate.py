"""Seed annotation behind ``tools/prox_annotate.py``: a teacher LLM labels documents or writes chunk
programs; the valid answers become chat-format SFT examples for a refining model.

Every example's ``messages`` are :func:`megatron_slm.refine.prompts.chat_messages` of the user
message ``tools/prox_refine.py`` sends at inference (the document, truncated by ``doc_message``
as at inference when ``--tokenizer`` is given; or one ``[doc]...[/doc]`` chunk split by the same
``split_into_chunks``), plus the program as the assistant's answer.

Resume: every teacher answer is appended to ``<output>.journal`` (one JSON line, fsync'd) as it
arrives; a rerun reads the journal and sends only the requests without an answer. The journal's
first line records what determines the answers (stage, teacher, prompt files); another run's
journal is refused. ``<output>`` and ``<output>.stats.json`` are written atomically at the end,
from the journal, in input order.

Document stage requests: the educational-value grade for every document, then the format grade
only for documents graded edu = 2 (the only case where it changes the label).

``--programs FILE`` instead of ``--teacher``: the answers are existing programs (a rule-based
labeller's, a larger refining model's, ProX's released ones once in this format), read by the
reader of ``tools/prox_refine.py apply`` (``sources.ProgramFile``) and matched by ``--id-key``.
Doc stage: the ``doc_program`` (``keep_doc()``/``drop_doc()``) is the answer; a null one leaves
the document out. Chunk stage: the document is split as above and each chunk gets
:func:`megatron_slm.refine.seeds.chunk_part` of the document-wide ``chunk_program``, then the same
grammar check as a teacher's program. No requests, no journal; the outputs are written atomically.
"""

from __future__ import annotations

import hashlib
import os
import time

from megatron_slm.atomic_io import write_json_atomic, write_jsonl_atomic
from megatron_slm.crash_points import CrashPoints
from megatron_slm.output_lock import OutputLock, OutputLockedError
from megatron_slm.progress import ProgressBar
from megatron_slm.refine.annotate_config import AnnotateConfig, AnnotateError
from megatron_slm.refine.annotate_inputs import (
    JOURNAL_FORMAT,
    KILL_HOOK_ENV,
    Journal,
    load_prompts,
    read_documents,
    request_key,
    teacher_messages,
)
from megatron_slm.refine.chunking import split_into_chunks, wrap_chunk
from megatron_slm.refine.decision import RefineError
from megatron_slm.refine.program import parse_program
from megatron_slm.refine.prompts import chat_messages, doc_message
from megatron_slm.refine.seeds import (
    KEEP_PROGRAM,
    check_chunk_program,
    chunk_part,
    clean_program,
    doc_answer,
    doc_label,
    needs_format_grade,
    parse_score,
)
from megatron_slm.refine.sources import ProgramFile
from megatron_slm.refine.teachers import LocalTeacher, OpenAITeacher, TeacherError, is_url

# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
_crash = CrashPoints(KILL_HOOK_ENV)


def _load_tokenizer(config: AnnotateConfig):
    from megatron_slm.refine.backends import BackendError, load_tokenizer

    if not config.tokenizer:
        return None
    try:
        return load_tokenizer(
            config.tokenizer,
            "--tokenizer",
            sentencepiece_ok=True,
            trust_remote_code=config.trust_remote_code,
        )
    except BackendError as e:
        raise AnnotateError(str(e)) from None


def make_teacher(config: AnnotateConfig, log):
    if is_url(config.teacher):
        return OpenAITeacher(
            config.teacher,
            config.teacher_model,
            os.environ.get(config.api_key_env) or None,
            config.timeout,
            config.max_retries,
            config.backoff,
            concurrency=config.concurrency,
            log=log,
            allow_insecure_http=config.teacher_allow_insecure_http,
        )
    from megatron_slm.refine.backends import BackendError

    if not os.path.isdir(config.teacher):
        raise AnnotateError(f"--teacher {config.teacher}: neither an http(s) URL nor a directory")
    try:
        return LocalTeacher(
            config.teacher,
            config.device,
            config.dtype,
            config.batch_size,
            config.trust_remote_code,
        )
    except BackendError as e:
        raise AnnotateError(str(e)) from None


def manifest(config: AnnotateConfig, prompts: dict[str, str]) -> dict:
    teacher = (
        {"url": config.teacher.rstrip("/"), "model": config.teacher_model}
        if is_url(config.teacher)
        else {"dir": os.path.abspath(config.teacher)}
    )
    return {
        "format": JOURNAL_FORMAT,
        "version": 1,
        "stage": config.stage,
        "teacher": teacher,
        "max_new_tokens": config.max_new_tokens,
        "prompts": {k: hashlib.sha256(v.encode()).hexdigest()[:16] for k, v in prompts.items()},
    }


class _Asker:
    """Sends the requests the journal has no answer for; progress with rate and ETA."""

    def __init__(self, teacher, journal: Journal, config: AnnotateConfig, stats: dict, log):
        self.teacher, self.journal, self.config, self.stats, self.log = (
            teacher,
            journal,
            config,
            stats,
            log,
        )

    def ask(self, phase: str, requests: dict[str, list[dict]]) -> None:
        todo = [(k, m) for k, m in requests.items() if k not in self.journal.answers]
        self.stats["requests"] += len(requests)
        self.stats["requests_resumed"] += len(requests) - len(todo)
        if not todo:
            return
        bar = ProgressBar(f"prox_annotate {phase}", len(todo), "requests")
        done = 0

        def on_answer(key, answer, error):
            nonlocal done
            self.journal.add(key, answer, error)
            self.stats["requests_sent"] += 1
            done += 1
            bar.update(done, extra=f"retries {self.teacher.retries}")
            _crash.reached("answer")

        try:
            self.teacher.answer_all(todo, self.config.max_new_tokens, on_answer)
        except TeacherError as e:
            raise AnnotateError(f"{e} (answers so far are kept; rerun to resume)") from None
        bar.update(done, extra=f"retries {self.teacher.retries}", final=True)


def _answer(journal: Journal, key: str, stats: dict, what: str):
    answer, error = journal.answers[key]
    if answer is None:
        _count_malformed(stats, what)
    return answer


def _seed(messages, source, record, stage, **extra) -> dict:
    seed = {"messages": messages, "metadata": {"stage": stage, "source": source, **extra}}
    if "id" in record:
        seed["id"] = record["id"]
    return seed


def _lock_output(config: AnnotateConfig) -> OutputLock:
    out_dir = os.path.dirname(os.path.abspath(config.output))
    if not os.path.isdir(out_dir):
        raise AnnotateError(f"--output {config.output}: directory {out_dir} does not exist")
    lock = OutputLock(config.output + ".lock", f"--output {config.output}")
    try:
        lock.acquire()
    except OutputLockedError as e:
        raise AnnotateError(str(e)) from None
    return lock


def annotate(config: AnnotateConfig, log=print, teacher=None) -> dict:
    """Annotate; returns the statistics (also written to ``<output>.stats.json``). ``teacher``:
    any object with the teachers' ``answer_all``/``retries`` (e.g. a scripted labeller); default:
    the one ``--teacher`` names."""
    docs = read_documents(config.input, config.text_key)
    if config.programs is not None:
        return _from_programs(config, docs, log)
    prompts = load_prompts(config.prompts_dir, config.stage)
    tokenizer = _load_tokenizer(config)
    lock = _lock_output(config)
    start = time.perf_counter()
    try:
        teacher = teacher if teacher is not None else make_teacher(config, log)
        journal = Journal(config.output + ".journal", manifest(config, prompts))
        stats = {
            "stage": config.stage,
            "documents": len(docs),
            "requests": 0,
            "requests_sent": 0,
            "requests_resumed": 0,
            "malformed": 0,
            "malformed_reasons": {},
            "seeds": 0,
        }
        asker = _Asker(teacher, journal, config, stats, log)
        try:
            if config.stage == "doc":
                seeds = _doc_stage(docs, prompts, tokenizer, config, asker, journal, stats)
            else:
                seeds = _chunk_stage(docs, prompts, tokenizer, config, asker, journal, stats)
        finally:
            journal.close()
        stats["retries"] = teacher.retries
        _write(config, seeds, stats, start)
    finally:
        lock.release()
    log(format_summary(stats))
    return stats


def _write(config: AnnotateConfig, seeds: list[dict], stats: dict, start: float) -> None:
    stats["seeds"] = len(seeds)
    stats["seconds"] = round(time.perf_counter() - start, 3)
    write_jsonl_atomic(config.output, seeds)
    write_json_atomic(config.output + ".stats.json", stats)


def _doc_user_message(text: str, tokenizer, config: AnnotateConfig) -> str:
    """The document as prox_refine.py sends it, cut to fit the prompt with a tokenizer."""
    if tokenizer is None:
        return text
    return doc_message(tokenizer, text, config.doc_max_prompt_tokens)[0]


def _count_malformed(stats: dict, reason: str) -> None:
    stats["malformed"] += 1
    stats["malformed_reasons"][reason] = stats["malformed_reasons"].get(reason, 0) + 1


def _from_programs(config: AnnotateConfig, docs, log) -> dict:
    """``--programs``: the seeds' answers are the file's programs (no requests, no journal)."""
    try:
        table = ProgramFile(config.programs, config.id_key)
        found = [table.lookup(record, source) for source, record, _ in docs]
    except RefineError as e:
        raise AnnotateError(str(e)) from None
    tokenizer = _load_tokenizer(config)
    lock = _lock_output(config)
    start = time.perf_counter()
    try:
        stats = {
            "stage": config.stage,
            "documents": len(docs),
            "programs": config.programs,
            "malformed": 0,
            "malformed_reasons": {},
            "seeds": 0,
        }
        if config.stage == "doc":
            seeds = _doc_programs(docs, [doc for doc, _ in found], tokenizer, config, stats)
        else:
            seeds = _chunk_programs(docs, [chunk for _, chunk in found], tokenizer, config, stats)
        _write(config, seeds, stats, start)
    finally:
        lock.release()
    log(format_summary(stats))
    return stats


def _doc_programs(docs, programs, tokenizer, config, stats: dict) -> list[dict]:
    seeds = []
    labels = {"keep": 0, "drop": 0, "excluded": 0}
    for (source, record, text), program in zip(docs, programs):
        if program is None:
            labels["excluded"] += 1
            continue
        label, reason = doc_answer(program)
        if label is None:
            _count_malformed(stats, f"doc_program: {reason.split(': ', 1)[-1][:60]}")
            continue
        labels["keep" if label == KEEP_PROGRAM else "drop"] += 1
        user = _doc_user_message(text, tokenizer, config)
        seeds.append(_seed(chat_messages(user, label), source, record, "doc"))
    stats["labels"] = labels
    return seeds


def _chunk_programs(docs, programs, tokenizer, config, stats: dict) -> list[dict]:
    count = _token_counter(tokenizer)
    seeds = _ChunkSeeds(stats)
    stats.update(chunks=0, documents_excluded=0)
    for (source, record, text), program in zip(docs, programs):
        if not text.split():
            continue  # prox_refine drops empty documents without asking the model
        if program is None:
            stats["documents_excluded"] += 1
            continue
        parsed = parse_program(program, "chunk")
        if parsed.errors or not parsed.operations:
            reason = parsed.errors[0].reason[:60] if parsed.errors else "empty program"
            _count_malformed(stats, f"chunk_program: {reason}")
            continue
        chunks, _ = split_into_chunks(text, count, config.chunk_max_tokens, config.line_prefix)
        for chunk in chunks:
            stats["chunks"] += 1
            part = chunk_part(parsed.operations, text, chunk.first_line, chunk.last_line)
            seeds.add(part, source, record, text, chunk)
    return seeds.finish()


class _ChunkSeeds:
    """Chunk seeds whose programs pass the grammar check; the others counted by reason."""

    def __init__(self, stats: dict):
        self.stats, self.seeds, self.invalid = stats, [], {}
        stats["programs_invalid"] = 0

    def add(self, program: str, source: str, record: dict, text: str, chunk) -> None:
        reason = check_chunk_program(program, text, chunk.first_line, chunk.last_line)
        if reason is not None:
            self.stats["programs_invalid"] += 1
            kind = reason.split(": ", 1)[-1].split(" (")[0][:60]
            self.invalid[kind] = self.invalid.get(kind, 0) + 1
            return
        messages = chat_messages(wrap_chunk(chunk.body), program)
        lines = [chunk.first_line, chunk.last_line]
        self.seeds.append(_seed(messages, source, record, "chunk", lines=lines))

    def finish(self) -> list[dict]:
        self.stats["malformed"] += self.stats["programs_invalid"]
        top = sorted(self.invalid.items(), key=lambda kv: -kv[1])[:20]
        self.stats["invalid_reasons"] = dict(top)
        return self.seeds


def _token_counter(tokenizer):
    def count(lines):
        return [len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]

    return count


def _doc_stage(docs, prompts, tokenizer, config, asker: _Asker, journal: Journal, stats: dict):
    n = config.max_new_tokens
    edu_keys, requests = [], {}
    for _, _, text in docs:
        messages = teacher_messages(prompts["edu"], "edu", text)
        key = request_key(messages, n)
        edu_keys.append(key)
        requests[key] = messages
    asker.ask("edu", requests)
    edu: list[int | None] = []
    for key in edu_keys:
        answer = _answer(journal, key, stats, "edu: no answer")
        score = parse_score(answer) if answer is not None else None
        if answer is not None and score is None:
            _count_malformed(stats, "edu: no 0-5 score")
        edu.append(score)
    fmt_keys: dict[int, str] = {}
    requests = {}
    for i, (_, _, text) in enumerate(docs):
        if edu[i] is not None and needs_format_grade(edu[i]):
            messages = teacher_messages(prompts["format"], "format", text)
            fmt_keys[i] = request_key(messages, n)
            requests[fmt_keys[i]] = messages
    asker.ask("format", requests)
    seeds = []
    labels = {"keep": 0, "drop": 0, "excluded": 0}
    for i, (source, record, text) in enumerate(docs):
        if edu[i] is None:
            continue
        fmt = None
        if i in fmt_keys:
            answer = _answer(journal, fmt_keys[i], stats, "format: no answer")
            fmt = parse_score(answer) if answer is not None else None
            if fmt is None:
                if answer is not None:
                    _count_malformed(stats, "format: no 0-5 score")
                continue
        label = doc_label(edu[i], fmt)
        if label is None:
            labels["excluded"] += 1
            continue
        labels["keep" if label.startswith("keep") else "drop"] += 1
        user = _doc_user_message(text, tokenizer, config)
        seeds.append(
            _seed(chat_messages(user, label), source, record, "doc", edu=edu[i], format=fmt)
        )
    stats["labels"] = labels
    return seeds


def _chunk_stage(docs, prompts, tokenizer, config, asker: _Asker, journal: Journal, stats: dict):
    count = _token_counter(tokenizer)
    n = config.max_new_tokens
    items, requests = [], {}
    for source, record, text in docs:
        if not text.split():
            continue  # prox_refine drops empty documents without asking the model
        chunks, _ = split_into_chunks(text, count, config.chunk_max_tokens, config.line_prefix)
        for chunk in chunks:
            wrapped = wrap_chunk(chunk.body)
            messages = teacher_messages(prompts["chunk"], "chunk", wrapped)
            key = request_key(messages, n)
            items.append((source, record, text, chunk, key))
            requests[key] = messages
    stats["chunks"] = len(items)
    asker.ask("chunk", requests)
    seeds = _ChunkSeeds(stats)
    for source, record, text, chunk, key in items:
        answer = _answer(journal, key, stats, "chunk: no answer")
        if answer is None:
            continue
        seeds.add(clean_program(answer), source, record, text, chunk)
    return seeds.finish()


def format_summary(stats: dict) -> str:
    head = f"prox_annotate {stats['stage']}: {stats['documents']:,} documents -> "
    if "programs" in stats:
        head += (
            f"{stats['seeds']:,} seeds from the programs in {stats['programs']}, "
            f"{stats['malformed']:,} malformed programs"
        )
    else:
        head += (
            f"{stats['seeds']:,} seeds; {stats['requests']:,} requests "
            f"({stats['requests_sent']:,} sent now, {stats['requests_resumed']:,} from the "
            f"journal, {stats['retries']:,} retries), {stats['malformed']:,} malformed answers"
        )
    lines = [head]
    if "labels" in stats:
        lab = stats["labels"]
        lines.append(
            f"  labels: keep {lab['keep']:,}, drop {lab['drop']:,}, excluded {lab['excluded']:,}"
        )
    if "programs_invalid" in stats:
        excluded = stats.get("documents_excluded")
        lines.append(
            f"  chunks {stats['chunks']:,}, invalid programs {stats['programs_invalid']:,}"
            + (f", documents without a chunk program {excluded:,}" if excluded else "")
            + (f" ({stats['invalid_reasons']})" if stats["invalid_reasons"] else "")
        )
    return "\n".join(lines)
