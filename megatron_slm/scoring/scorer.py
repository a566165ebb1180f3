"""Offline reference scoring: one reference loss per token of a token dataset, into its sidecar.

``score_corpus(ScoreConfig(...))`` is the library behind ``tools/score_corpus.py``. For each
``--data-prefix P`` it writes the sidecar ``P_refloss.bin/.json`` (``megatron_slm.data.sidecar``):
the value at position ``i`` of a document is the reference model's cross entropy of token ``i``
given the tokens before it in that document (NaN at position 0).

Work decomposition
------------------
Documents are cut into *chunks* of ``--commit-interval`` consecutive documents. A chunk is the unit
of packing (:mod:`.packing`), of work assignment and of commit: chunk ``c`` is packed into rows the
same way in every run, so a document's values never depend on where a run started or on the
data-parallel size. Each round, data-parallel rank ``d`` scores the ``d``-th not yet committed chunk
of the round; all ranks of its model-parallel group (TP, PP) score the same chunk. The writer rank
of the group (TP rank 0 of the last pipeline stage) writes the chunk's values with
``SidecarWriter.write_range`` (data fsync'd, then the range recorded), then global rank 0 replaces
the progress file ``P_refloss.progress.json`` atomically.

Resume: the recorded ranges of the partial sidecar are the truth about what was written; a rerun
scores the missing chunks and publishes a sidecar byte-identical to an uninterrupted run's. The
sidecar metadata records the settings that influence the values (sequence length, stride,
micro-batch size, commit interval, TP/PP sizes, parameter dtype), so a rerun with other settings is
refused instead of mixing values. The progress file holds counters for the progress bar and is
checked: an unreadable one is an error (``--overwrite`` starts over).

The forward uses the fused per-token loss (``megatron_slm.ops.selective_cross_entropy``, ratio 1,
no gradient), which handles the vocabulary-parallel logits of TP > 1. With PP > 1 the chunk's
micro-batches go through megatron-core's pipeline schedule with ``forward_only=True`` and the
losses are computed on the last stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_slm.atomic_io import write_json_atomic
from megatron_slm.scoring.packing import (
    document_segments,
    length_sorted_batches,
    make_batches,
    pack_rows,
    scatter_losses,
)

logger = logging.getLogger("megatron_slm")

PROGRESS_FORMAT = "megatron-slm-score-progress"
PROGRESS_VERSION = 1
KILL_HOOK_ENV = "MEGATRON_SLM_SCORE_KILL_AT"
"""Test hook: ``<point>:<k>`` makes global rank 0 SIGKILL itself at the k-th (1-based) occurrence
of ``point``: ``range`` (a round's values written, progress file not yet), ``commit`` (progress
file written), ``finalize`` (all rounds done, before publication)."""


class ScoringError(ValueError):
    """Bad input or state for scoring, with a message naming the flag or file at fault."""


def _flag(help: str, **argparse_kwargs) -> dict:
    return {"help": help, "argparse": argparse_kwargs}


@dataclass
class ScoreConfig:
    """Settings of ``tools/score_corpus.py`` (Megatron-LM flag names; the CLI is generated from
    these fields)."""

    data_prefix: list[str] = field(
        default_factory=list,
        metadata=_flag(
            "token dataset prefixes (<P>.bin/.idx); a sidecar is written next to each. Numbers "
            "among them (Megatron --data-path weights) are ignored",
            nargs="+",
            required=True,
        ),
    )
    load: str = field(
        default="", metadata=_flag("reference model checkpoint (root or iter_N dir)", required=True)
    )
    tokenizer_type: str | None = field(
        default=None, metadata=_flag("tokenizer type (default: from the checkpoint metadata)")
    )
    tokenizer_model: str | None = field(
        default=None, metadata=_flag("tokenizer model (default: from the checkpoint metadata)")
    )
    vocab_size: int | None = field(
        default=None, metadata=_flag("NullTokenizer vocabulary size", type=int)
    )
    model_preset: str | None = field(
        default=None,
        metadata=_flag("architecture preset replacing the checkpoint's (then flags override)"),
    )
    num_layers: int | None = field(default=None, metadata=_flag("override", type=int))
    hidden_size: int | None = field(default=None, metadata=_flag("override", type=int))
    ffn_hidden_size: int | None = field(default=None, metadata=_flag("override", type=int))
    num_attention_heads: int | None = field(default=None, metadata=_flag("override", type=int))
    num_query_groups: int | None = field(default=None, metadata=_flag("override", type=int))
    max_position_embeddings: int | None = field(default=None, metadata=_flag("override", type=int))
    rotary_base: float | None = field(default=None, metadata=_flag("override", type=float))
    make_vocab_size_divisible_by: int | None = field(
        default=None,
        metadata=_flag("vocabulary padding (default: checkpoint's, else 128)", type=int),
    )
    bf16: bool = field(
        default=False, metadata=_flag("run the model in bfloat16", action="store_true")
    )
    tensor_model_parallel_size: int = field(default=1, metadata=_flag("TP size", type=int))
    pipeline_model_parallel_size: int = field(default=1, metadata=_flag("PP size", type=int))
    seq_length: int | None = field(
        default=None,
        metadata=_flag(
            "row length = most context per scored token (default: the --seq-length the "
            "reference model was trained with, else its max_position_embeddings)",
            type=int,
        ),
    )
    stride: int | None = field(
        default=None,
        metadata=_flag(
            "sliding-window step for documents longer than --seq-length; scored tokens keep at "
            "least seq-length - stride tokens of context (default: seq-length / 2)",
            type=int,
        ),
    )
    micro_batch_size: int = field(
        default=4,
        metadata=_flag(
            "rows of --seq-length per forward (length-sorted batching: the same number of "
            "positions, in more, shorter rows)",
            type=int,
        ),
    )
    packing: str = field(
        default="auto",
        metadata=_flag(
            "rows: several documents per row, block-diagonal causal mask; length-sorted: one "
            "document per row, rows of similar length batched, plain causal attention (PP=1 "
            "only); auto: length-sorted with PP=1, else rows",
            choices=["auto", "rows", "length-sorted"],
        ),
    )
    dtype: str = field(
        default="float16",
        metadata=_flag("sidecar value dtype", choices=["float16", "bfloat16", "float32"]),
    )
    commit_interval: int = field(
        default=1000,
        metadata=_flag("documents per chunk = packing and commit unit", type=int),
    )
    max_docs: int | None = field(
        default=None,
        metadata=_flag(
            "score only the first N documents (trial; progress kept, sidecar not published)",
            type=int,
        ),
    )
    dry_run: bool = field(
        default=False,
        metadata=_flag(
            "score one chunk per data-parallel rank, write nothing, print a time estimate",
            action="store_true",
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=_flag(
            "replace a published sidecar; discard partial state that does not match",
            action="store_true",
        ),
    )
    device: str = field(
        default="auto", metadata=_flag("auto | cpu | cuda", choices=["auto", "cpu", "cuda"])
    )
    seed: int = field(
        default=1234, metadata=_flag("random seed (scoring is deterministic)", type=int)
    )

    def __post_init__(self):
        prefixes = []
        for p in self.data_prefix:
            try:
                float(p)
            except ValueError:
                prefixes.append(p)
        self.data_prefix = prefixes
        if not self.data_prefix:
            raise ScoringError("--data-prefix: give at least one token dataset prefix")
        if not self.load:
            raise ScoringError("--load: the reference model checkpoint is required")
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "micro_batch_size",
            "commit_interval",
        ):
            if getattr(self, name) < 1:
                raise ScoringError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("seq_length", "stride", "max_docs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ScoringError(f"--{name.replace('_', '-')} must be >= 1")
        if self.packing not in ("auto", "rows", "length-sorted"):
            raise ScoringError(
                f"--packing must be auto, rows or length-sorted, got {self.packing!r}"
            )
        if self.packing == "length-sorted" and self.pipeline_model_parallel_size > 1:
            raise ScoringError(
                "--packing length-sorted needs --pipeline-model-parallel-size 1 (pipeline stages "
                "exchange fixed shapes); use --packing rows"
            )
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ScoringError(f"--dtype must be float16, bfloat16 or float32, got {self.dtype!r}")


@dataclass
class ScoreReport:
    """What one data prefix's scoring did."""

    data_prefix: str
    sidecar_prefix: str
    published: bool
    documents: int
    """Documents scored by this run (all ranks)."""
    tokens: int
    """Tokens of those documents."""
    seconds: float
    tokens_per_second: float
    mean_ref_loss: float
    """Mean of the stored values of the published sidecar (NaN excluded); of this run's values
    when not published."""
    documents_total: int = 0
    tokens_total: int = 0
    estimated_seconds: float | None = None
    """--dry-run: estimated time to score every remaining document with this layout."""

    def format(self) -> str:
        head = "dry run" if self.estimated_seconds is not None else "scored"
        lines = [
            f"{head} {self.data_prefix}: {self.documents} documents, {self.tokens} tokens in "
            f"{self.seconds:.1f} s ({self.tokens_per_second:,.0f} tokens/s), mean reference loss "
            f"{self.mean_ref_loss:.4f}"
        ]
        if self.estimated_seconds is not None:
            lines.append(
                f"  estimate for the remaining corpus ({self.documents_total} documents, "
                f"{self.tokens_total} tokens): {_hms(self.estimated_seconds)}"
            )
        elif self.published:
            lines.append(f"  sidecar published: {self.sidecar_prefix}.bin / .json")
        else:
            lines.append(f"  sidecar not published (partial state kept in {self.sidecar_prefix}.*)")
        return "\n".join(lines)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--:--"
    s = int(seconds + 0.5)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------
# inputs: data, checkpoint, model, tokenizer
# ---------------------------------------------------------------------------------------------
def _check_data_prefix(prefix: str) -> None:
    from megatron_slm.data.indexed import get_bin_path, get_idx_path

    for path in (get_idx_path(prefix), get_bin_path(prefix)):
        if not os.path.isfile(path):
            raise ScoringError(f"--data-prefix {prefix}: token dataset file {path} not found")


def _resolve_model(config: ScoreConfig, meta: dict):
    from megatron_slm.models import GPTModelConfig, get_preset

    if config.model_preset:
        try:
            base = get_preset(config.model_preset)
        except ValueError as e:
            raise ScoringError(str(e)) from None
    elif "model" in meta:
        try:
            base = GPTModelConfig(**meta["model"])
        except (TypeError, ValueError) as e:
            raise ScoringError(f"--load {config.load}: bad model config in metadata ({e})") from e
    else:
        raise ScoringError(
            f"--load {config.load}: no model config in metadata; pass --model-preset"
        )
    overrides = {
        name: getattr(config, name)
        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "max_position_embeddings",
            "rotary_base",
        )
    }
    try:
        return base.replace(**overrides)
    except ValueError as e:
        raise ScoringError(str(e)) from None


def _resolve_tokenizer(config: ScoreConfig, meta: dict):
    """The tokenizer (or None when neither the flags nor the checkpoint name one)."""
    from megatron_slm.data.tokenizer import build_tokenizer

    recorded = meta.get("tokenizer") or {}
    ttype = config.tokenizer_type or recorded.get("type")
    if ttype is None:
        return None
    if config.tokenizer_type and config.tokenizer_type != recorded.get("type"):
        recorded = {}  # a different tokenizer: do not mix in the checkpoint's model/vocab
    model = config.tokenizer_model or recorded.get("model")
    vocab = config.vocab_size or recorded.get("vocab_size")
    try:
        return build_tokenizer(ttype, model, vocab)
    except (OSError, ValueError) as e:
        raise ScoringError(f"--tokenizer-type {ttype} --tokenizer-model {model}: {e}") from e


def _reference_identity(ckpt_dir: str, meta: dict, tokenizer) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    ident = f"{os.path.abspath(ckpt_dir)}:iteration={meta.get('iteration')}:meta-sha256={digest}"
    if tokenizer is not None:
        ident += f":tokenizer={tokenizer.identity()}"
    return ident


def checkpoint_seq_length(meta: dict) -> int | None:
    """The training sequence length recorded by the trainer (``config.training.seq_length`` of
    the checkpoint metadata; a top-level ``seq_length`` also works), None when absent."""
    training = ((meta.get("config") or {}).get("training")) or {}
    value = meta.get("seq_length") or training.get("seq_length")
    return int(value) if value else None


def default_stride(seq_length: int) -> int:
    """Default --stride: three quarters of the sequence length.

    Scored tokens of long documents keep at least seq_length / 4 tokens of context (512 at 2048),
    and each of their tokens is forwarded about 1.33 times instead of 2 (stride seq/2). Measured on
    the CPU benchmark: scoring/training tokens/s 2.81-2.91x at 3/4 vs 2.45x at 1/2
    (benchmarks/RESULTS_score_corpus.md). Pass --stride for more context."""
    return max(1, seq_length * 3 // 4)


@dataclass
class _Inputs:
    model: object  # GPTModelConfig
    ckpt_dir: str
    meta: dict
    tokenizer: object
    vocab_limit: int
    seq_length: int
    stride: int
    divisible_by: int
    reference: str


def resolve_inputs(config: ScoreConfig) -> _Inputs:
    """Check every input that can be checked without a process group (same result on all ranks)."""
    from megatron_slm.training.checkpointing import read_metadata, resolve_checkpoint

    for prefix in config.data_prefix:
        _check_data_prefix(prefix)
    try:
        ckpt_dir = resolve_checkpoint(config.load, "--load")
        meta = read_metadata(ckpt_dir, "--load")
    except ValueError as e:
        raise ScoringError(str(e)) from None
    model = _resolve_model(config, meta)
    tokenizer = _resolve_tokenizer(config, meta)
    vocab_limit = model.vocab_size
    if tokenizer is not None:
        if tokenizer.vocab_size > model.vocab_size:
            raise ScoringError(
                f"tokenizer vocabulary ({tokenizer.vocab_size} ids, {tokenizer.identity()}) is "
                f"larger than the reference model's --vocab-size {model.vocab_size}"
            )
        vocab_limit = tokenizer.vocab_size
    seq = config.seq_length or checkpoint_seq_length(meta) or model.max_position_embeddings
    stride = config.stride or default_stride(seq)
    if stride > seq:
        raise ScoringError(f"--stride {stride} must be <= --seq-length {seq}")
    divisible_by = config.make_vocab_size_divisible_by or int(
        meta.get("make_vocab_size_divisible_by") or 128
    )
    return _Inputs(
        model=model,
        ckpt_dir=ckpt_dir,
        meta=meta,
        tokenizer=tokenizer,
        vocab_limit=vocab_limit,
        seq_length=seq,
        stride=stride,
        divisible_by=divisible_by,
        reference=_reference_identity(ckpt_dir, meta, tokenizer),
    )


def scoring_settings(config: ScoreConfig, inputs: _Inputs) -> dict:
    """The settings recorded in the sidecar metadata: everything that changes the stored bytes."""
    return {
        "tool": "tools/score_corpus.py",
        "seq_length": inputs.seq_length,
        "stride": inputs.stride,
        "micro_batch_size": config.micro_batch_size,
        "commit_interval": config.commit_interval,
        "packing": _packing_mode(config),
        "tensor_model_parallel_size": config.tensor_model_parallel_size,
        "pipeline_model_parallel_size": config.pipeline_model_parallel_size,
        "params_dtype": "bfloat16" if config.bf16 else "float32",
        "make_vocab_size_divisible_by": inputs.divisible_by,
    }


# ---------------------------------------------------------------------------------------------
# progress file
# ---------------------------------------------------------------------------------------------
def progress_path(data_prefix: str) -> str:
    from megatron_slm.data.sidecar import sidecar_prefix

    return sidecar_prefix(data_prefix) + ".progress.json"


_PROGRESS_KEYS = ("format", "version", "reference", "settings", "fingerprint", "num_documents")


def read_progress(path: str) -> dict | None:
    """The progress file's content, None when absent; ScoringError when unreadable."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScoringError(
            f"progress file {path} is corrupted ({e}); delete it and the partial sidecar next to "
            f"it, or rerun with --overwrite, to score from scratch"
        ) from None
    missing = [k for k in _PROGRESS_KEYS if not isinstance(state, dict) or k not in state]
    if missing or state.get("format") != PROGRESS_FORMAT:
        raise ScoringError(
            f"progress file {path} is corrupted (not a {PROGRESS_FORMAT} file"
            + (f", missing {', '.join(missing)}" if missing else "")
            + "); delete it and the partial sidecar next to it, or rerun with --overwrite"
        )
    if state.get("version") != PROGRESS_VERSION:
        raise ScoringError(
            f"progress file {path}: version {state.get('version')!r} is not supported "
            f"(this tool writes version {PROGRESS_VERSION})"
        )
    return state


def _kill_hook(point: str, counts: dict) -> None:
    spec = os.environ.get(KILL_HOOK_ENV)
    if not spec:
        return
    name, _, k = spec.partition(":")
    if name != point:
        return
    counts[point] = counts.get(point, 0) + 1
    if counts[point] == int(k or 1):
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
class _Model:
    """The reference model chunks of this rank, loaded, in eval mode, with a forward to losses."""

    def __init__(self, config: ScoreConfig, inputs: _Inputs, device: torch.device):
        from megatron.core import parallel_state

        from megatron_slm.models import ModelBuildOptions, build_model
        from megatron_slm.training.checkpointing import load_checkpoint

        self.device = device
        self.dtype = torch.bfloat16 if config.bf16 else torch.float32
        opts = ModelBuildOptions(
            transformer_impl="torch",
            params_dtype=self.dtype,
            make_vocab_size_divisible_by=inputs.divisible_by,
        )
        try:
            self.chunks = build_model(inputs.model, opts, device)
        except ValueError as e:
            raise ScoringError(str(e)) from None
        try:
            load_checkpoint(inputs.ckpt_dir, self.chunks, weights_only=True)
        except Exception as e:  # noqa: BLE001 - shape mismatches surface as many types
            raise ScoringError(
                f"--load {config.load}: cannot load the weights into the model "
                f"({type(e).__name__}: {e}); do the model flags match the checkpoint?"
            ) from e
        for c in self.chunks:
            c.eval()
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.last_stage = parallel_state.is_pipeline_last_stage()
        self.seq_length = inputs.seq_length

    def _step(self, model, batch):
        """Forward of one batch on one model chunk: logits ``[b, s, v/tp]`` on the last stage,
        hidden states ``[s, b, h]`` on the others.

        megatron-core's RoPE rotates by the position in the row (0 .. s-1), not by
        ``position_ids`` (passed anyway: they matter to learned absolute embeddings). Rotary
        attention depends only on the distance between query and key, so a document packed at
        offset ``o`` gets the same scores as alone, up to rounding (the exactness tests bound it).
        """
        mask = None if batch.attention_mask is None else batch.attention_mask.to(self.device)
        return model(batch.tokens.to(self.device), batch.position_ids.to(self.device), mask)

    def losses(self, batches) -> list[np.ndarray]:
        """``[b, s]`` float32 per-position losses of each batch (on the last pipeline stage; an
        empty list elsewhere)."""
        from megatron_slm.ops import selective_cross_entropy

        def to_losses(logits, batch):
            # logits [b, s, v/tp] -> [s, b, v/tp]; fp32 loss, TP all-reduce inside the op.
            out = selective_cross_entropy(
                logits.transpose(0, 1), batch.labels.to(self.device).transpose(0, 1)
            )
            return out.loss.transpose(0, 1).float().cpu().numpy()  # [b, s]

        with torch.no_grad():
            if self.pp == 1:
                (model,) = self.chunks
                result = []
                for batch in batches:
                    logits = self._step(model, batch)
                    result.append(to_losses(logits, batch))
                return result
            return self._pipeline_losses(batches, to_losses)

    def _pipeline_losses(self, batches, to_losses) -> list[np.ndarray]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        collected: list[np.ndarray] = []
        it = iter(batches)

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            logits = self._step(model, batch)

            def loss_func(output):
                losses = to_losses(output, batch)
                collected.append(losses)
                zero = torch.zeros((), device=self.device)
                return zero, torch.ones((), dtype=torch.int, device=self.device), {}

            return logits, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=it,
            model=self.chunks[0] if len(self.chunks) == 1 else self.chunks,
            num_microbatches=len(batches),
            seq_length=self.seq_length,
            micro_batch_size=batches[0].tokens.shape[0],
            forward_only=True,
        )
        return collected if self.last_stage else []


# ---------------------------------------------------------------------------------------------
# scoring one dataset
# ---------------------------------------------------------------------------------------------
class _ProgressBar:
    """Rank 0's progress line: ``\\r`` updates on a terminal, a line every 10 s in a log."""

    def __init__(self, name: str, total_tokens: int, enabled: bool):
        self.name, self.total, self.enabled = name, total_tokens, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last = -1e9

    def update(self, docs: int, tokens: int, loss_sum: float, count: int, final=False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = tokens / elapsed
        frac = tokens / self.total if self.total else 1.0
        eta = (self.total - tokens) / rate if rate > 0 else float("inf")
        width = 24
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        mean = loss_sum / count if count else float("nan")
        line = (
            f"[score {self.name}] [{bar}] {100 * frac:5.1f}% {docs} docs {tokens}/{self.total} "
            f"tokens | {rate:,.0f} tokens/s | ETA {_hms(eta)} | mean ref loss {mean:.4f}"
        )
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _broadcast(obj, device):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_if_any(error: str | None, device) -> None:
    err = _broadcast(error, device)
    if err is not None:
        raise ScoringError(err)


def _prepare_output(prefix, config, inputs, settings, is_rank0, device):
    """Rank 0 opens (or creates / resumes) the partial sidecar and the progress file; every rank
    gets the same verdict. Returns rank 0's writer (None on other ranks and in a dry run)."""
    from megatron_slm.data.sidecar import SidecarError, SidecarWriter, sidecar_exists

    error, writer = None, None
    if is_rank0 and not config.dry_run:
        try:
            if sidecar_exists(prefix) and not config.overwrite:
                raise ScoringError(
                    f"--data-prefix {prefix}: the sidecar {prefix}_refloss.json already exists; "
                    f"pass --overwrite to replace it"
                )
            ppath = progress_path(prefix)
            try:
                state = read_progress(ppath)
            except ScoringError:
                if not config.overwrite:
                    raise
                state = None
            kwargs = dict(
                dtype=config.dtype,
                reference=inputs.reference,
                settings=settings,
                overwrite=config.overwrite,
            )
            try:
                writer = SidecarWriter.open_or_resume(prefix, **kwargs)
            except SidecarError:
                if not config.overwrite:
                    raise
                writer = SidecarWriter(prefix, **kwargs)  # discards the mismatched partial state
                state = None
            meta = writer.metadata
            expect = {
                "reference": meta["reference"],
                "settings": meta["settings"],
                "fingerprint": meta["token_dataset"]["fingerprint"],
                "num_documents": meta["num_documents"],
            }
            if state is not None and any(state.get(k) != v for k, v in expect.items()):
                if not writer.completed_ranges():
                    state = None  # stale progress of an earlier, discarded partial sidecar
                else:
                    bad = sorted(k for k, v in expect.items() if state.get(k) != v)
                    raise ScoringError(
                        f"progress file {ppath} does not match the partial sidecar "
                        f"({', '.join(bad)} differ); delete both or rerun with --overwrite"
                    )
            if state is None:
                state = {
                    "format": PROGRESS_FORMAT,
                    "version": PROGRESS_VERSION,
                    **expect,
                    "documents_done": 0,
                    "tokens_done": 0,
                    "runs": 0,
                }
            state["runs"] = int(state.get("runs", 0)) + 1
            write_json_atomic(ppath, state)
        except (ScoringError, SidecarError, FileExistsError) as e:
            error = str(e)
    _raise_if_any(error, device)
    return writer


def _open_writer_rank(prefix, config, inputs, settings):
    from megatron_slm.data.sidecar import SidecarWriter

    return SidecarWriter.open_or_resume(
        prefix,
        dtype=config.dtype,
        reference=inputs.reference,
        settings=settings,
        overwrite=config.overwrite,
    )


def _chunks_todo(writer, n_docs: int, interval: int, limit: int) -> list[int]:
    """Chunk ids whose documents are not all recorded as written (documents < limit)."""
    done = np.zeros(n_docs, dtype=bool)
    if writer is not None:
        for a, b in writer.completed_ranges():
            done[a:b] = True
    todo = []
    for c in range(-(-limit // interval)):
        a, b = c * interval, min((c + 1) * interval, n_docs)
        if not done[a:b].all():
            todo.append(c)
    return todo


def _packing_mode(config: ScoreConfig) -> str:
    if config.packing == "auto":
        return "rows" if config.pipeline_model_parallel_size > 1 else "length-sorted"
    return config.packing


def _chunk_batches(docs, lengths, tokens, inputs: _Inputs, config: ScoreConfig):
    """The micro-batches of one chunk, as one list (= one call of the model: one pipeline schedule
    with PP > 1, where the last batch is padded to the full micro-batch size)."""
    seq = inputs.seq_length
    items = document_segments(docs, lengths, seq, inputs.stride)
    if _packing_mode(config) == "length-sorted":
        yield length_sorted_batches(items, tokens, config.micro_batch_size * seq)
        return
    segs, n_rows = pack_rows(items, seq)
    if n_rows:
        pad = config.pipeline_model_parallel_size > 1
        yield make_batches(segs, n_rows, tokens, seq, config.micro_batch_size, pad_last=pad)


def _token_memmap(prefix: str, dataset) -> np.ndarray:
    """All token ids ``[n_tokens]`` of the dataset, memory-mapped (documents back to back, as
    megatron-core's builder writes them; checked against the index's pointers)."""
    from megatron_slm.data.indexed import get_bin_path

    index = dataset.index
    dtype = np.dtype(index.dtype)
    pointers = np.asarray(index.sequence_pointers, dtype=np.int64)
    lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
    if len(pointers) and not np.array_equal(
        pointers, np.concatenate([[0], np.cumsum(lengths)[:-1]]) * dtype.itemsize
    ):
        raise ScoringError(f"--data-prefix {prefix}: documents are not stored back to back")
    if not lengths.sum():
        return np.zeros(0, dtype=dtype)
    return np.memmap(get_bin_path(prefix), dtype=dtype, mode="r")


def _check_ids(prefix, tokens, offsets, chunk, interval, n_docs, vocab_limit) -> None:
    """ScoringError when chunk ``chunk`` has an id outside the model/tokenizer vocabulary."""
    first, end = chunk * interval, min((chunk + 1) * interval, n_docs)
    lo, hi = int(offsets[first]), int(offsets[end])
    if hi <= lo:
        return
    biggest = int(tokens[lo:hi].max())
    if biggest >= vocab_limit:
        raise ScoringError(
            f"--data-prefix {prefix}: documents {first}..{end - 1} contain token id {biggest}, "
            f"outside the vocabulary of the reference model/tokenizer ({vocab_limit} ids)"
        )


def _mean_of_sidecar(prefix: str) -> float:
    from megatron_slm.data.sidecar import SidecarReader, decode_values

    reader = SidecarReader(prefix)
    total, count = 0.0, 0
    step = 1 << 24
    values = reader.values
    for lo in range(0, reader.num_tokens, step):
        v = decode_values(np.asarray(values[lo : lo + step]), reader.dtype).astype(np.float64)
        ok = np.isfinite(v)
        total += float(v[ok].sum())
        count += int(ok.sum())
    return total / count if count else float("nan")


def score_dataset(prefix: str, config: ScoreConfig, inputs: _Inputs, model: _Model) -> ScoreReport:
    """Score one token dataset (collective over all ranks)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    device = model.device
    rank = dist.get_rank()
    is_rank0 = rank == 0
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    is_writer = model.last_stage and parallel_state.get_tensor_model_parallel_rank() == 0
    settings = scoring_settings(config, inputs)

    dataset = IndexedDataset(prefix)
    lengths = np.array(dataset.sequence_lengths, dtype=np.int64)  # [n_docs]
    n_docs = len(lengths)
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    limit = min(n_docs, config.max_docs) if config.max_docs else n_docs
    interval = config.commit_interval

    writer = _prepare_output(prefix, config, inputs, settings, is_rank0, device)
    dist.barrier()
    if is_writer and not config.dry_run and writer is None:
        writer = _open_writer_rank(prefix, config, inputs, settings)
    todo = _broadcast(_chunks_todo(writer, n_docs, interval, limit) if is_rank0 else None, device)
    remaining_docs = sum(min((c + 1) * interval, n_docs) - c * interval for c in todo)
    remaining_tokens = sum(
        int(offsets[min((c + 1) * interval, n_docs)] - offsets[c * interval]) for c in todo
    )
    if config.dry_run:
        todo = todo[:dp]
    tokens_mmap = _token_memmap(prefix, dataset)  # [total tokens] (our datasets are contiguous)
    todo_tokens = sum(
        int(offsets[min((c + 1) * interval, n_docs)] - offsets[c * interval]) for c in todo
    )
    bar = _ProgressBar(os.path.basename(prefix), todo_tokens, is_rank0)
    kills: dict = {}
    run_docs = run_tokens = 0
    loss_sum, loss_count = 0.0, 0
    start = time.perf_counter()
    for r in range(-(-len(todo) // dp)):
        round_chunks = todo[r * dp : (r + 1) * dp]
        # Every rank checks every chunk of the round, so a bad id fails all ranks alike.
        for c in round_chunks:
            _check_ids(prefix, tokens_mmap, offsets, c, interval, n_docs, inputs.vocab_limit)
        stats = torch.zeros(4, dtype=torch.float64, device=device)
        if dp_rank < len(round_chunks):
            c = round_chunks[dp_rank]
            first, end = c * interval, min((c + 1) * interval, n_docs)
            docs = list(range(first, end))
            tokens = {
                d: np.asarray(tokens_mmap[offsets[d] : offsets[d + 1]], dtype=np.int64)
                for d in docs
            }
            values = {d: np.full(int(lengths[d]), np.nan, dtype=np.float32) for d in docs}
            for batches in _chunk_batches(docs, lengths[first:end], tokens, inputs, config):
                for batch, losses in zip(batches, model.losses(batches)):
                    scatter_losses(batch, losses, values)
            if is_writer:
                vals = [values[d] for d in docs]
                if not config.dry_run:
                    writer.write_range(first, vals)
                flat = np.concatenate(vals).astype(np.float64) if vals else np.zeros(0)
                ok = np.isfinite(flat)
                stats += torch.tensor(
                    [len(docs), int(lengths[first:end].sum()), flat[ok].sum(), ok.sum()],
                    dtype=torch.float64,
                    device=device,
                )
        if is_rank0:
            _kill_hook("range", kills)
        dist.all_reduce(stats)
        d_docs, d_tokens, d_sum, d_count = (float(x) for x in stats.cpu())
        run_docs += int(d_docs)
        run_tokens += int(d_tokens)
        loss_sum += d_sum
        loss_count += int(d_count)
        if is_rank0 and not config.dry_run:
            ppath = progress_path(prefix)
            state = read_progress(ppath) or {}
            state["documents_done"] = int(state.get("documents_done", 0)) + int(d_docs)
            state["tokens_done"] = int(state.get("tokens_done", 0)) + int(d_tokens)
            write_json_atomic(ppath, state)
            _kill_hook("commit", kills)
        bar.update(run_docs, run_tokens, loss_sum, loss_count)
    seconds = time.perf_counter() - start
    bar.update(run_docs, run_tokens, loss_sum, loss_count, final=True)
    rate = run_tokens / seconds if seconds > 0 else 0.0

    published = False
    mean = loss_sum / loss_count if loss_count else float("nan")
    total_docs_left = total_tokens_left = 0
    estimate = None
    if config.dry_run:
        total_docs_left, total_tokens_left = remaining_docs, remaining_tokens
        estimate = total_tokens_left / rate if rate > 0 else float("inf")
    elif limit == n_docs:
        dist.barrier()
        error = None
        if is_rank0:
            _kill_hook("finalize", kills)
            try:
                writer.finalize()
                os.remove(progress_path(prefix))
            except Exception as e:  # noqa: BLE001 - reported on every rank
                error = f"cannot publish the sidecar of {prefix}: {e}"
        _raise_if_any(error, device)
        published = True
        mean = _mean_of_sidecar(prefix)
    if writer is not None and not published:
        writer.close()
    from megatron_slm.data.sidecar import sidecar_prefix

    return ScoreReport(
        data_prefix=prefix,
        sidecar_prefix=sidecar_prefix(prefix),
        published=published,
        documents=run_docs,
        tokens=run_tokens,
        seconds=seconds,
        tokens_per_second=rate,
        mean_ref_loss=mean,
        documents_total=total_docs_left,
        tokens_total=total_tokens_left,
        estimated_seconds=estimate,
    )


def score_corpus(config: ScoreConfig, *, initialize: bool = True) -> list[ScoreReport]:
    """Score every ``config.data_prefix`` with the reference model ``config.load``.

    Collective: call on every rank (torchrun / srun / a world of one). ``initialize=False`` reuses
    an already initialised megatron parallel state with the requested TP/PP sizes.
    """
    import torch.distributed as dist

    from megatron_slm import launch

    inputs = resolve_inputs(config)
    if initialize:
        device = launch.initialize(
            device=config.device,
            tensor_model_parallel_size=config.tensor_model_parallel_size,
            pipeline_model_parallel_size=config.pipeline_model_parallel_size,
            seed=config.seed,
        )
    else:
        from megatron_slm.platform import resolve_device

        device = resolve_device(config.device)
    if not inputs.tokenizer:
        logger.info("no tokenizer given or recorded: checking ids against the model vocabulary")
    model = _Model(config, inputs, device)
    reports = []
    for prefix in config.data_prefix:
        report = score_dataset(prefix, config, inputs, model)
        if dist.get_rank() == 0:
            print(report.format(), flush=True)
        reports.append(report)
    return reports


def add_arguments(parser) -> None:
    """Add one ``--flag`` per :class:`ScoreConfig` field to an ``argparse`` parser."""
    for f in dataclasses.fields(ScoreConfig):
        kwargs = dict(f.metadata["argparse"])
        default = f.default if f.default is not dataclasses.MISSING else None
        if kwargs.get("action") != "store_true":
            kwargs.setdefault("default", default)
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, help=f.metadata["help"], **kwargs
        )


def config_from_args(args) -> ScoreConfig:
    """``argparse`` namespace -> :class:`ScoreConfig` (validated)."""
    return ScoreConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ScoreConfig)})
