"""Counters of a refining run: per shard, summed over shards, and the one-line summary."""

from __future__ import annotations

COUNTERS = (
    "documents",
    "kept",
    "dropped",
    "lines_removed",
    "normalizations",
    "programs",
    "programs_with_errors",
    "program_errors",
    "words_before",
    "words_after",
    "chars_before",
    "chars_after",
)


def new_stats(with_tokens: bool) -> dict:
    stats = {k: 0 for k in COUNTERS}
    stats["decisions"] = {}
    if with_tokens:
        stats["tokens_before"] = stats["tokens_after"] = 0
    return stats


def add_stats(total: dict, part: dict) -> None:
    for key, value in part.items():
        if key == "decisions":
            for d, n in value.items():
                total["decisions"][d] = total["decisions"].get(d, 0) + n
        elif isinstance(value, int):
            total[key] = total.get(key, 0) + value


def finish_stats(stats: dict) -> dict:
    stats["decisions"] = dict(sorted(stats["decisions"].items()))
    stats["error_rate"] = (
        round(stats["programs_with_errors"] / stats["programs"], 6) if stats["programs"] else 0.0
    )
    return stats


def format_summary(title: str, stats: dict) -> str:
    decisions = ", ".join(f"{k} {v:,}" for k, v in stats["decisions"].items()) or "none"
    words = stats["words_before"]
    lines = [
        f"{title}: {stats['documents']:,} documents -> {stats['kept']:,} kept, "
        f"{stats['dropped']:,} dropped ({decisions})",
        f"  lines removed {stats['lines_removed']:,}, normalizations "
        f"{stats['normalizations']:,}, program errors {stats['program_errors']:,} (error rate "
        f"{100 * stats['error_rate']:.1f}% of {stats['programs']:,} programs)",
        f"  words {words:,} -> {stats['words_after']:,}"
        + (f" ({100 * stats['words_after'] / words:.1f}%)" if words else ""),
    ]
    if "tokens_before" in stats:
        lines.append(f"  tokens {stats['tokens_before']:,} -> {stats['tokens_after']:,}")
    return "\n".join(lines)
