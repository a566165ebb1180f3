"""JSONL corpus -> megatron-core ``IndexedDataset`` (the library behind tools/preprocess_data.py).

Output, for every JSON key ``k``: ``<output_prefix>_<k>_document.bin/.idx`` in megatron-core's
format, one sequence per non-empty document (Megatron-LM's ``preprocess_data.py`` without
sentence splitting: an empty document adds a document boundary but no sequence, and gets no EOD).

Pipeline: the main process reads lines in batches (``_BATCH_LINES`` lines or ``_BATCH_BYTES``
bytes), workers parse + tokenize a whole batch (``json.loads`` then one batched
``tokenize_batch``) and return compact numpy arrays, the main process appends them to the
builders in input order (results are consumed in submission order, at most ``2 * workers``
batches in flight, so any number of workers gives the same bytes). Files are written under
unique temporary names and published when everything succeeded, each pair so that a reader finds
the old pair, the new pair or no index at all, never a mismatched pair
(``indexed.publish_pair``). A run holds ``<output_prefix>.lock`` (``output_lock.OutputLock``) and
first repairs what a killed run on the same outputs left (``indexed.recover_pair``).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from megatron_slm.cli import arg
from megatron_slm.data.indexed import DocumentBuilder, optimal_token_dtype, recover_pair
from megatron_slm.data.tokenizer import (
    TOKENIZER_TYPES,
    TokenizerOptionArgs,
    build_tokenizer,
    check_tokenizer_flags,
    model_path_of,
)
from megatron_slm.errors import ConfigError, InputFileError
from megatron_slm.output_lock import OutputLock

logger = logging.getLogger(__name__)

# A batch is the unit of work sent to a worker. 512 lines / 4 MiB keeps the per-batch IPC and
# Python overhead well under 1% of tokenization time while bounding the memory in flight
# (workers * 2 batches); measured with benchmarks/bench_preprocess.py.
_BATCH_LINES = 512
_BATCH_BYTES = 4 << 20


@dataclass
class PreprocessConfig(TokenizerOptionArgs):
    """Settings of tools/preprocess_data.py (Megatron-LM's flags), for ``preprocess_corpus``."""

    input: list[str] = arg([], "JSONL files or globs, read in order.", required=True)
    json_keys: list[str] = arg(["text"], "JSON keys to tokenize, one dataset each.")
    skip_bad_lines: bool = arg(False, "Skip (and count) malformed lines instead of failing.")
    tokenizer_type: str = arg(
        None, "Tokenizer (Megatron-LM name).", required=True, choices=TOKENIZER_TYPES
    )
    tokenizer_model: str | None = arg(None, "Sentencepiece model file / Hugging Face directory.")
    vocab_file: str | None = arg(None, "GPT2BPETokenizer's vocab.json.")
    merge_file: str | None = arg(None, "GPT2BPETokenizer's merges.txt.")
    vocab_size: int | None = arg(
        None,
        "NullTokenizer: its ids before the EOD (EOD = N, as Megatron-LM's); a "
        "TikTokenizer's (special ids included) cuts it.",
    )
    append_eod: bool = arg(False, "Append the tokenizer's EOD to each non-empty document.")
    output_prefix: str = arg(None, "Writes <prefix>_<key>_document.bin/.idx.", required=True)
    workers: int = arg(1, "Tokenizing processes (the output is identical for any number).")
    partitions: int = arg(
        1,
        "Megatron-LM's file partitions, each with --workers / --partitions processes (it must "
        "divide --workers): the same --workers processes tokenize here, one shared pool, and "
        "documents are written in input order, Megatron-LM's order with "
        "--keep-sequential-samples (without it Megatron-LM interleaves the partitions' lines).",
    )
    keep_sequential_samples: bool = arg(
        False, "Accepted (Megatron-LM's flag): documents are always written in input order."
    )
    log_interval: int = arg(10000, "Documents between progress logs (0: never).")

    def __post_init__(self):
        if not self.input:
            raise ConfigError("--input is required")
        if not self.json_keys:
            raise ConfigError("--json-keys: need at least one key")
        if self.tokenizer_type is None:
            raise ConfigError("--tokenizer-type is required")
        check_tokenizer_flags(self)
        if not self.output_prefix:
            raise ConfigError("--output-prefix is required")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.partitions < 1 or self.workers % self.partitions:
            raise ConfigError(
                f"--partitions {self.partitions} must be >= 1 and divide --workers "
                f"{self.workers} (each partition gets workers / partitions processes)"
            )
        if self.log_interval < 0:
            raise ConfigError(f"--log-interval must be >= 0, got {self.log_interval}")

    def run(self) -> PreprocessResult:
        """``preprocess_corpus`` with these settings."""
        return preprocess_corpus(
            self.input,
            self.output_prefix,
            self.tokenizer_type,
            tokenizer_model=self.tokenizer_model,
            vocab_size=self.vocab_size,
            vocab_file=self.vocab_file,
            merge_file=self.merge_file,
            tiktoken=self.tiktoken_options(),
            trust_remote_code=self.trust_remote_code,
            json_keys=self.json_keys,
            append_eod=self.append_eod,
            workers=self.workers,
            skip_bad_lines=self.skip_bad_lines,
            log_interval=self.log_interval,
        )


@dataclass
class _Batch:
    """Raw lines of one input file: ``lines[i]`` is line ``first_line + i`` (1-based)."""

    file: str
    first_line: int
    lines: list[bytes]
    nbytes: int


@dataclass
class _Encoded:
    """A worker's result: per key, concatenated ids ``[n_tokens]`` and lengths ``[n_docs]``."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    num_docs: int
    bad_lines: list[tuple[str, int, str]]  # (file, line, reason)
    nbytes: int


class PreprocessResult(dict):
    """``{json_key: output prefix}`` plus run statistics as attributes."""

    num_documents: int = 0
    num_tokens: int = 0
    skipped_lines: int = 0
    elapsed_s: float = 0.0


def _make_dirs(path: str) -> list[str]:
    """``os.makedirs``; returns the directories it created, deepest first."""
    missing = []
    while path and not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    if missing:
        os.makedirs(missing[0], exist_ok=True)
    return missing


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    """Paths and globs -> the list of files (globs sorted; order of arguments kept)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    files: list[str] = []
    for pattern in inputs:
        if glob.has_magic(pattern):
            matched = sorted(glob.glob(pattern))
            if not matched:
                raise FileNotFoundError(f"--input: no file matches {pattern!r}")
            files.extend(matched)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise FileNotFoundError(f"--input: no such file {pattern!r}")
    return files


def _read_batches(files: Sequence[str]) -> Iterator[_Batch]:
    for path in files:
        with open(path, "rb") as f:
            lines: list[bytes] = []
            nbytes, first = 0, 1
            for lineno, line in enumerate(f, start=1):
                if not lines:
                    first = lineno
                lines.append(line)
                nbytes += len(line)
                if len(lines) >= _BATCH_LINES or nbytes >= _BATCH_BYTES:
                    yield _Batch(path, first, lines, nbytes)
                    lines, nbytes = [], 0
            if lines:
                yield _Batch(path, first, lines, nbytes)


# -- worker side ---------------------------------------------------------------------------------
_STATE: dict = {}


def _init_pool_worker(*init_args) -> None:
    """A --workers process tokenizes on one core: the Rust tokenizers library (GPT2BPETokenizer,
    HuggingFaceTokenizer) would start a thread per core in each of them. (2 cores, a GPT-2 BPE:
    0.95 M tokens/s batched over both, 0.54 M on one; --workers N processes use N cores.)"""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _init_worker(*init_args)


def _init_worker(tokenizer_args: tuple, json_keys: tuple, append_eod: bool, dtype) -> None:
    _STATE.update(
        tokenizer=build_tokenizer(*tokenizer_args),
        json_keys=json_keys,
        append_eod=append_eod,
        dtype=dtype,
    )


def _encode_batch(batch: _Batch) -> _Encoded:
    tok, keys = _STATE["tokenizer"], _STATE["json_keys"]
    texts: dict[str, list[str]] = {k: [] for k in keys}
    bad: list[tuple[str, int, str]] = []
    loads = json.loads
    for i, line in enumerate(batch.lines):
        if not line.strip():
            continue  # blank lines carry no document
        try:
            doc = loads(line)
            if not isinstance(doc, dict):
                raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
            values = [doc[k] for k in keys]
        except KeyError as e:
            bad.append((batch.file, batch.first_line + i, f"missing key {e.args[0]!r}"))
            continue
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            bad.append((batch.file, batch.first_line + i, str(e)))
            continue
        for k, v in zip(keys, values):
            if not isinstance(v, str):
                bad.append((batch.file, batch.first_line + i, f"{k!r} is not a string"))
                break
        else:
            for k, v in zip(keys, values):
                texts[k].append(v)
    tokens, lengths = {}, {}
    for k in keys:
        ids = tok.tokenize_batch(texts[k]) if texts[k] else []
        if _STATE["append_eod"]:
            eod = tok.eod
            for seq in ids:
                if seq:
                    seq.append(eod)
        n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))  # [n_docs]
        flat = np.fromiter(  # [sum(n)]
            itertools.chain.from_iterable(ids), dtype=_STATE["dtype"], count=int(n.sum())
        )
        tokens[k], lengths[k] = flat, n
    num_docs = len(texts[keys[0]]) if keys else 0
    return _Encoded(tokens, lengths, num_docs, bad, batch.nbytes)


# -- main side -----------------------------------------------------------------------------------
def _ordered_map(pool, fn, items, max_in_flight: int) -> Iterator:
    """``pool.imap(fn, items)`` in order, but with at most ``max_in_flight`` items submitted
    (``imap`` drains its input eagerly: a whole corpus would sit in memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _format_eta(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def preprocess_corpus(
    inputs: str | Sequence[str],
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tiktoken: dict | None = None,
    trust_remote_code: bool = False,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    skip_bad_lines: bool = False,
    log_interval: int = 10000,
) -> PreprocessResult:
    """Tokenize JSONL files into megatron-core indexed datasets.

    Args:
        inputs: JSONL paths or globs (``--input``), read in order.
        output_prefix: ``--output-prefix``; key ``k`` goes to ``<output_prefix>_<k>_document``.
        tokenizer_type, tokenizer_model, vocab_size: see ``build_tokenizer``.
        vocab_file, merge_file: a GPT2BPETokenizer's ``vocab.json`` and ``merges.txt``.
        tiktoken: a TikTokenizer's options (``build_tokenizer``).
        trust_remote_code: a HuggingFaceTokenizer may run the code its directory ships.
        json_keys: the JSON fields to tokenize, one dataset each (``--json-keys``).
        append_eod: append the tokenizer's EOD to every non-empty document.
        workers: tokenizing processes (1: in this process). Output is identical for any value.
        skip_bad_lines: skip (and count) malformed lines instead of raising ``ValueError``.
        log_interval: log progress every this many documents (0: never).

    Returns:
        ``{key: prefix}`` with ``num_documents``, ``num_tokens``, ``skipped_lines``, ``elapsed_s``.

    Raises:
        ValueError: a malformed line (``<file>:<line>: <reason>``) without ``skip_bad_lines``.
    """
    files = expand_inputs(inputs)
    json_keys = tuple(json_keys)
    if not json_keys:
        raise ConfigError("--json-keys: need at least one key")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    model = model_path_of(tokenizer_type, tokenizer_model, vocab_file)
    tokenizer_args = (tokenizer_type, model, vocab_size, merge_file, tiktoken, trust_remote_code)
    tokenizer = build_tokenizer(*tokenizer_args)
    dtype = optimal_token_dtype(tokenizer.vocab_size)
    init_args = (tokenizer_args, json_keys, append_eod, dtype)

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    created = _make_dirs(out_dir)  # removed again if the run fails: nothing left behind
    prefixes = {k: f"{output_prefix}_{k}_document" for k in json_keys}
    lock = OutputLock(output_prefix + ".lock", f"--output-prefix {output_prefix}")
    builders = {}
    total_bytes = sum(os.path.getsize(f) for f in files)

    result = PreprocessResult(prefixes)
    t0 = time.perf_counter()
    done_bytes, next_log = 0, log_interval
    pool = None
    try:
        lock.acquire()
        for p in prefixes.values():
            repaired = recover_pair(p)
            if repaired:
                logger.warning("%s: a killed run's leftovers: %s", p, repaired)
        builders = {k: DocumentBuilder(p, dtype) for k, p in prefixes.items()}
        if workers == 1:
            _init_worker(*init_args)
            encoded = map(_encode_batch, _read_batches(files))
        else:
            ctx = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
            pool = ctx.Pool(workers, initializer=_init_pool_worker, initargs=init_args)
            encoded = _ordered_map(pool, _encode_batch, _read_batches(files), 2 * workers)
        for enc in encoded:
            if enc.bad_lines:
                if not skip_bad_lines:
                    file, line, reason = enc.bad_lines[0]
                    raise InputFileError(
                        f"{file}:{line}: malformed JSONL line: {reason} "
                        "(use --skip-bad-lines to skip such lines)"
                    )
                for file, line, reason in enc.bad_lines:
                    logger.warning("skipping %s:%d: %s", file, line, reason)
                result.skipped_lines += len(enc.bad_lines)
            for k in json_keys:
                builders[k].add_documents(enc.tokens[k], enc.lengths[k])
                result.num_tokens += int(enc.tokens[k].size)
            result.num_documents += enc.num_docs
            done_bytes += enc.nbytes
            if log_interval and result.num_documents >= next_log:
                next_log = result.num_documents + log_interval
                dt = max(time.perf_counter() - t0, 1e-9)
                eta = (total_bytes - done_bytes) / max(done_bytes / dt, 1e-9)
                logger.info(
                    "processed %d documents (%.0f docs/s, %.0f tokens/s, %.1f MB/s), ETA %s",
                    result.num_documents,
                    result.num_documents / dt,
                    result.num_tokens / dt,
                    done_bytes / dt / 1e6,
                    _format_eta(eta),
                )
        for b in builders.values():
            b.finalize()
    except BaseException:
        for b in builders.values():
            b.abort()
        if created and lock.held:  # our lock file alone in the directory this run created
            lock.release()
            with contextlib.suppress(OSError):
                os.remove(lock.path)
        for d in created:
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only if still empty
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        lock.release()
    result.elapsed_s = time.perf_counter() - t0
    dt = max(result.elapsed_s, 1e-9)
    logger.info(
        "done: %d documents, %d tokens in %.1f s (%.0f docs/s, %.0f tokens/s)%s -> %s",
        result.num_documents,
        result.num_tokens,
        result.elapsed_s,
        result.num_documents / dt,
        result.num_tokens / dt,
        f", skipped {result.skipped_lines} bad lines" if result.skipped_lines else "",
        ", ".join(prefixes.values()),
    )
    return result
