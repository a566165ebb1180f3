"""The coverage curve of a compact tokenizer, to choose N by looking (RethinkTinyLM's tokenizer
study weighs the share of the corpus a vocabulary covers against what it costs).

For vocabulary sizes N: the share of the counted tokens whose piece the pruned model keeps (the
selection ``prune --vocab-size N`` makes, :class:`~megatron_slm.tinylm.prune.Ranking`) and, on
held-out text, the pruned model's tokens per UTF-8 byte; plus, for each target coverage C, the
smallest N reaching it (what ``prune --coverage C`` picks). ``count`` prints it as a table and
writes ``<counts>.coverage.json`` and ``<counts>.coverage.png``.
"""

from __future__ import annotations

import io

import numpy as np

from megatron_slm.tinylm import spm
from megatron_slm.tinylm.prune import Ranking, mandatory_ids, pruned_proto
from megatron_slm.tinylm.report import tokens_per_byte

TABLE_SIZES = 12  # default rows; each costs a pruned model and a held-out encode
LINE_SIZES = 64  # default points of the plotted coverage line (cheap: no model is built)


def size_range(proto) -> tuple[int, int]:
    """The sizes a pruned model can have: (mandatory pieces, mandatory + normal pieces)."""
    mandatory = set(mandatory_ids(proto))
    normal = {i for i, p in enumerate(proto.pieces) if p.type == spm.NORMAL}
    return len(mandatory), len(mandatory | normal)


def default_sizes(proto, points: int) -> list[int]:
    """``points`` sizes spaced geometrically from max(mandatory, largest / 64) to the largest:
    coverage rises steeply at small N and flattens out."""
    lo, hi = size_range(proto)
    start = max(lo, hi // 64, 1)
    return sorted({int(round(x)) for x in np.geomspace(start, hi, points)} | {hi})


def curve_paths(counts_path: str) -> tuple[str, str]:
    """``counts.npy`` -> (``counts.coverage.json``, ``counts.coverage.png``)."""
    base = counts_path[:-4] if counts_path.endswith(".npy") else counts_path
    return base + ".coverage.json", base + ".coverage.png"


def coverage_curve(
    proto, counts: np.ndarray, sizes: list[int], targets: list[float], heldout: list[str] | None
) -> dict:
    """The curve as a JSON-able dict: ``rows`` (``vocab_size``, ``coverage``, the ``targets``
    it is the smallest N for, and with held-out text ``tokens`` and ``tokens_per_byte``),
    ``line`` (``[N, coverage]`` at more sizes, for the picture) and ``targets`` (C -> N)."""
    ranking = Ranking(proto, counts)
    chosen = {t: ranking.smallest_size(t, "--curve-coverages") for t in targets}
    rows = []
    full = None
    if heldout:
        full = tokens_per_byte(spm.processor(proto), heldout)
    for n in sorted(set(sizes) | set(chosen.values())):
        row = {
            "vocab_size": n,
            "coverage": ranking.coverage(n),
            "targets": [t for t in targets if chosen[t] == n],
        }
        if heldout:
            small = spm.processor(pruned_proto(proto, ranking.select(n, "--curve-sizes").kept))
            tpb = tokens_per_byte(small, heldout)
            row["tokens"], row["tokens_per_byte"] = tpb["tokens"], tpb["tokens_per_byte"]
        rows.append(row)
    lo, hi = size_range(proto)
    line = {int(round(x)) for x in np.linspace(lo, hi, LINE_SIZES)}
    line = sorted(line | {r["vocab_size"] for r in rows})
    curve = {
        "pieces": len(proto.pieces),
        "mandatory": lo,
        "counted_tokens": float(np.sum(counts)),
        "rows": rows,
        "line": [[n, ranking.coverage(n)] for n in line],
        "targets": {str(t): n for t, n in chosen.items()},
    }
    if heldout:
        curve["heldout"] = {"documents": len(heldout), "bytes": full["bytes"],
                            "original": full}  # fmt: skip
    return curve


def curve_table(curve: dict) -> str:
    """The rows as text; a row that is the smallest N for a target coverage says so."""
    held = curve.get("heldout")
    head = f"coverage curve: {curve['pieces']} pieces, {curve['mandatory']} always kept"
    if held:
        o = held["original"]
        head += (
            f"; held-out: {held['documents']} documents, {o['tokens_per_byte']:.4f} tokens/byte "
            "with every piece"
        )
    cols = f"{'N':>8}  {'coverage':>9}"
    if held:
        cols += f"  {'tokens/byte':>11}  {'x tokens':>8}"
    lines = [head, cols]
    for r in curve["rows"]:
        line = f"{r['vocab_size']:>8}  {100 * r['coverage']:>8.3f}%"
        if held:
            ratio = r["tokens"] / held["original"]["tokens"] if held["original"]["tokens"] else 0
            line += f"  {r['tokens_per_byte']:>11.4f}  {ratio:>8.3f}"
        for t in r["targets"]:
            line += f"  <- smallest N with coverage >= {t:g} (prune --coverage {t:g})"
        lines.append(line)
    return "\n".join(lines)


def curve_png(curve: dict, title: str, width: int = 800, height: int = 480) -> bytes:
    """Coverage against N (the line), tokens per byte on held-out text (right axis, the table's
    sizes) and a dashed line at each target's N."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = zip(*curve["line"])
    ax.plot(xs, [100 * y for y in ys], color="tab:blue", lw=1.5)
    colors = ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive")
    for k, (t, n) in enumerate(curve["targets"].items()):
        ax.axvline(n, color=colors[k % len(colors)], ls="--", lw=1,
                   label=f"coverage {float(t) * 100:g}%: N = {n}")  # fmt: skip
    ax.set_xlabel("vocabulary size N (pieces kept)")
    ax.set_ylabel("coverage of counted tokens (%)", color="tab:blue")
    ax.grid(alpha=0.3)
    if "heldout" in curve:
        ax2 = ax.twinx()
        ns = [r["vocab_size"] for r in curve["rows"]]
        tpb = [r["tokens_per_byte"] for r in curve["rows"]]
        ax2.plot(ns, tpb, color="tab:red", marker="o", ms=3, lw=1)
        ax2.set_ylabel("held-out tokens per byte", color="tab:red")
    if curve["targets"]:
        ax.legend(fontsize=8, loc="center right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
