"""What pruning costs and saves: the prune report (``small.report.json`` and a printed summary).

- ``coverage``: share of the counted corpus tokens whose piece is kept (the rest will be split
  into smaller pieces when the corpus is re-tokenized);
- ``tokens_per_byte``: on a held-out sample, tokens per UTF-8 byte with the old and the new model
  (the compression cost: more tokens for the same text);
- ``embedding_parameters``: input embedding plus output layer rows (untied, as megatron_slm builds
  them), padded like Megatron-LM (multiple of the divisor), for a given hidden size.
"""

from __future__ import annotations

from megatron_slm.models.presets import padded_vocab_size


def coverage(counts, kept: list[int]) -> float:
    total = float(counts.sum())
    return float(counts[kept].sum()) / total if total > 0 else float("nan")


def tokens_per_byte(processor, texts: list[str]) -> dict:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in processor.encode(texts, num_threads=1))
    return {
        "bytes": n_bytes,
        "tokens": n_tokens,
        "tokens_per_byte": n_tokens / n_bytes if n_bytes else float("nan"),
    }


def embedding_parameters(vocab: int, hidden_size: int, divisible_by: int) -> dict:
    rows = padded_vocab_size(vocab, divisible_by, 1)
    return {"vocab_size": vocab, "padded_rows": rows, "parameters": 2 * rows * hidden_size}


def prune_report(
    *,
    proto_old,
    proto_new,
    selection,
    unreachable_kept: list[int],
    counts,
    heldout: list[str] | None,
    hidden_size: int,
    divisible_by: int,
) -> dict:
    """The report as a JSON-able dict."""
    from megatron_slm.tinylm import spm

    n_old, n_new = len(proto_old.pieces), len(proto_new.pieces)
    before = embedding_parameters(n_old, hidden_size, divisible_by)
    after = embedding_parameters(n_new, hidden_size, divisible_by)
    report = {
        "model_type": spm.model_type(proto_old),
        "pieces": {"before": n_old, "after": n_new},
        "kept": {
            "mandatory": len(selection.mandatory),
            "by_frequency": n_new - len(selection.mandatory) - len(selection.by_closure),
            "merge_closure": len(selection.by_closure),
            "unreachable_in_original": [
                proto_old.pieces[i].piece for i in selection.unreachable_in_original
            ],
        },
        "coverage": coverage(counts, selection.kept),
        "embedding_parameters": {
            "hidden_size": hidden_size,
            "make_vocab_size_divisible_by": divisible_by,
            "before": before["parameters"],
            "after": after["parameters"],
            "saved": before["parameters"] - after["parameters"],
        },
        "unreachable_kept": [proto_new.pieces[i].piece for i in unreachable_kept],
    }
    if heldout:
        old = tokens_per_byte(spm.processor(proto_old), heldout)
        new = tokens_per_byte(spm.processor(proto_new), heldout)
        report["heldout"] = {
            "documents": len(heldout),
            "before": old,
            "after": new,
            "tokens_ratio": new["tokens"] / old["tokens"] if old["tokens"] else float("nan"),
        }
    return report


def summary(report: dict) -> str:
    k, e = report["kept"], report["embedding_parameters"]
    lines = []
    if report.get("coverage_target") is not None:
        lines.append(
            f"--coverage {report['coverage_target']:g}: N = {report['pieces']['after']}, the "
            "smallest size whose kept pieces cover that share of the counted tokens"
        )
    lines += [
        f"pieces {report['pieces']['before']} -> {report['pieces']['after']} "
        f"({report['model_type']}): {k['mandatory']} mandatory, {k['by_frequency']} by frequency, "
        f"{k['merge_closure']} for merge closure",
        f"coverage of counted tokens: {100 * report['coverage']:.2f}%",
        f"embedding + output parameters at hidden {e['hidden_size']}: {e['before']:,} -> "
        f"{e['after']:,} (saved {e['saved']:,})",
    ]
    if "heldout" in report:
        h = report["heldout"]
        lines.append(
            f"held-out tokens per byte: {h['before']['tokens_per_byte']:.4f} -> "
            f"{h['after']['tokens_per_byte']:.4f} (x{h['tokens_ratio']:.3f} tokens)"
        )
    if k["unreachable_in_original"]:
        lines.append(
            f"{len(k['unreachable_in_original'])} kept pieces the original model cannot produce "
            "either (kept only to reach the vocabulary size)"
        )
    if report["unreachable_kept"]:
        lines.append(f"UNREACHABLE kept pieces: {report['unreachable_kept'][:20]}")
    else:
        lines.append("every kept piece is reachable (its own string encodes to it)")
    return "\n".join(lines)
