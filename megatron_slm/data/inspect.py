"""Summaries of reference-loss sidecars (the library behind tools/inspect_sidecar.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_slm.cli import arg
from megatron_slm.data.indexed import blend_prefixes
from megatron_slm.data.sidecar import SidecarError, SidecarReader
from megatron_slm.data.tokenizer import (
    TOKENIZER_TYPES,
    TokenizerOptionArgs,
    check_tokenizer_flags,
    tokenizer_of,
)

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
# Percentiles are exact up to this many scored values, else computed on an even stride sample.
_MAX_PERCENTILE_VALUES = 20_000_000
_CHUNK_TOKENS = 1 << 24  # values decoded per step (64 MiB of float32)


@dataclass
class InspectConfig(TokenizerOptionArgs):
    """Settings of tools/inspect_sidecar.py."""

    data_path: list[str] = arg(
        [], "Dataset prefixes (a --data-path blend's weights are ignored).", required=True
    )
    top: int = arg(0, "Show the N documents of highest mean reference loss.")
    bottom: int = arg(0, "Show the N documents of lowest mean reference loss.")
    tokenizer_type: str | None = arg(
        None, "Tokenizer to show --top/--bottom documents as text.", choices=TOKENIZER_TYPES
    )
    tokenizer_model: str | None = arg(None, "Sentencepiece model file / Hugging Face directory.")
    vocab_file: str | None = arg(None, "GPT2BPETokenizer's vocab.json.")
    merge_file: str | None = arg(None, "GPT2BPETokenizer's merges.txt.")
    vocab_size: int | None = arg(
        None,
        "NullTokenizer: its ids before the EOD (EOD = N, as Megatron-LM's); a "
        "TikTokenizer's (special ids included) cuts it.",
    )
    max_chars: int = arg(300, "Text shown per document.")
    json: bool = arg(False, "Print the reports as JSON.")

    def __post_init__(self):
        if not self.data_path:
            raise ValueError("--data-path is required")
        for name in ("top", "bottom", "max_chars"):
            if getattr(self, name) < 0:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be >= 0, got {getattr(self, name)}")
        check_tokenizer_flags(self)

    def build_tokenizer(self):
        """The tokenizer these flags name (None: no --tokenizer-type)."""
        return None if self.tokenizer_type is None else tokenizer_of(self)

    @property
    def prefixes(self) -> list[str]:
        """``--data-path`` without the blend weights."""
        return blend_prefixes(self.data_path)


def _doc_chunks(offsets: np.ndarray) -> list[tuple[int, int]]:
    """Document ranges ``[a, b)`` of about ``_CHUNK_TOKENS`` tokens each."""
    chunks, a, n = [], 0, len(offsets) - 1
    while a < n:
        b = int(np.searchsorted(offsets, offsets[a] + _CHUNK_TOKENS, side="right")) - 1
        b = min(max(b, a + 1), n)
        chunks.append((a, b))
        a = b
    return chunks


def inspect_sidecar(
    data_prefix: str, percentiles: Sequence[float] = PERCENTILES, top: int = 0, bottom: int = 0
) -> dict:
    """Statistics of the sidecar of ``data_prefix``.

    Returns a dict: ``ok`` (False with ``error`` when the sidecar is missing or does not match its
    token dataset: fingerprint/size/version/dtype checks of ``SidecarReader``), ``num_documents``,
    ``num_tokens``, ``nan_count``, ``coverage`` (scored / scorable tokens, where the first token
    of each document is not scorable), ``mean``, ``percentiles`` ``{p: value}``, and ``top`` /
    ``bottom``: ``[(doc, mean ref loss, n scored)]`` by per-document mean.
    """
    try:
        reader = SidecarReader(data_prefix)
    except (SidecarError, OSError) as e:
        return {"prefix": data_prefix, "ok": False, "error": str(e)}
    offsets = reader._offsets  # [n_docs + 1]
    n_docs, n_tokens = reader.num_documents, reader.num_tokens
    stride = max(1, -(-n_tokens // _MAX_PERCENTILE_VALUES))
    total, count, sample = 0.0, 0, []
    doc_sum = np.zeros(n_docs, dtype=np.float64)
    doc_cnt = np.zeros(n_docs, dtype=np.int64)
    for a, b in _doc_chunks(offsets):
        lo, hi = int(offsets[a]), int(offsets[b])
        vals = reader.get_flat(a, 0, hi - lo)  # [hi - lo] float32
        finite = np.isfinite(vals)
        clean = np.where(finite, vals, 0.0).astype(np.float64)
        total += float(clean.sum())
        count += int(finite.sum())
        starts = offsets[a:b] - lo
        nonempty = offsets[a + 1 : b + 1] > offsets[a:b]
        if len(vals):
            doc_sum[a:b][nonempty] = np.add.reduceat(clean, starts[nonempty])
            doc_cnt[a:b][nonempty] = np.add.reduceat(finite.astype(np.int64), starts[nonempty])
        sample.append(vals[finite][::stride] if stride > 1 else vals[finite])
    values = np.concatenate(sample) if sample else np.zeros(0, np.float32)
    scorable = n_tokens - int(np.count_nonzero(np.diff(offsets) > 0))
    report = {
        "prefix": data_prefix,
        "ok": True,
        "sidecar": reader.bin_path,
        "dtype": reader.dtype,
        "reference": reader.reference,
        "settings": reader.settings,
        "num_documents": n_docs,
        "num_tokens": n_tokens,
        "nan_count": n_tokens - count,
        "scored": count,
        "coverage": count / scorable if scorable else float("nan"),
        "mean": total / count if count else float("nan"),
        "percentiles": {
            p: float(v) for p, v in zip(percentiles, np.percentile(values, percentiles))
        }
        if len(values)
        else {},
        "percentiles_exact": stride == 1,
    }
    with np.errstate(invalid="ignore", divide="ignore"):
        doc_mean = doc_sum / doc_cnt
    scored_docs = np.flatnonzero(doc_cnt > 0)
    order = scored_docs[np.argsort(doc_mean[scored_docs], kind="stable")]
    pick = lambda ids: [(int(d), float(doc_mean[d]), int(doc_cnt[d])) for d in ids]
    report["top"] = pick(order[::-1][:top]) if top else []
    report["bottom"] = pick(order[:bottom]) if bottom else []
    return report


def format_report(report: dict, tokenizer=None, data=None, max_chars: int = 300) -> str:
    """Human-readable text of an ``inspect_sidecar`` report; with a ``tokenizer`` and the
    ``IndexedDataset`` ``data``, the top/bottom documents are shown as text."""
    lines = [f"== {report['prefix']}"]
    if not report["ok"]:
        lines.append(f"  FINGERPRINT/FORMAT CHECK FAILED: {report['error']}")
        return "\n".join(lines)
    lines += [
        f"  sidecar      {report['sidecar']} ({report['dtype']}), fingerprint OK",
        f"  reference    {report['reference']!r}  settings {report['settings']}",
        f"  documents    {report['num_documents']}   tokens {report['num_tokens']}",
        f"  scored       {report['scored']}   NaN {report['nan_count']}   "
        f"coverage {100 * report['coverage']:.2f}% of scorable tokens",
        f"  mean         {report['mean']:.4f}",
        "  percentiles  "
        + "  ".join(f"p{p:g}={v:.4f}" for p, v in report["percentiles"].items())
        + ("" if report["percentiles_exact"] else "  (sampled)"),
    ]
    for name in ("top", "bottom"):
        if report[name]:
            lines.append(f"  {name} documents by mean reference loss:")
            for doc, mean, n in report[name]:
                text = ""
                if tokenizer is not None and data is not None:
                    text = tokenizer.detokenize(data.get(doc).tolist())
                    text = text.replace("\n", "\\n")
                    text = "  " + (text[:max_chars] + "..." if len(text) > max_chars else text)
                lines.append(f"    doc {doc:>8d}  mean {mean:.4f}  scored {n}{text}")
    return "\n".join(lines)
