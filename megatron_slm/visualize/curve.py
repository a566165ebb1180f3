"""Held-out loss against tokens trained, for several runs' checkpoints, and Rho-1's "x times
faster": the tokens a run needs to reach the baseline's final loss (tools/learning_curve.py, the
quickstart's last step).

Tokens trained at a checkpoint = its recorded ``consumed_samples`` x the run's ``--seq-length``
(counted over all tokens seen, selected or not: Rho-1's x-axis). The tokens to reach a loss are
interpolated linearly between the first checkpoint at or below it and the one before.
"""

from __future__ import annotations

import glob
import io
import os
from dataclasses import dataclass

from megatron_slm.cli import arg
from megatron_slm.runtime.plan import DeviceArgs
from megatron_slm.visualize.selection import VisualizeError


@dataclass
class CurveConfig(DeviceArgs):
    runs: list[str] = arg([], "NAME=CHECKPOINT_ROOT per run (its iter_* directories are read).",
                          required=True)  # fmt: skip
    data: str | None = arg(None, "Held-out data: JSONL (text) or an indexed dataset prefix.",
                           required=True)  # fmt: skip
    baseline: str | None = arg(None, "Run whose final loss the others must reach (default: the "
                               "first of --runs).")  # fmt: skip
    seq_length: int = arg(128, "Evaluation segment length.")
    append_eod: bool = arg(False, "Append the end-of-document token to JSONL documents.")
    max_documents: int | None = arg(None, "Evaluate only the first N documents.")
    output: str | None = arg(None, "Output prefix: <P>.json and <P>.png.", required=True)

    def __post_init__(self):
        self.run_paths = {}
        for spec in self.runs:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise VisualizeError(f"--runs expects NAME=CHECKPOINT_ROOT, got {spec!r}")
            self.run_paths[name] = path
        if len(self.run_paths) < 1:
            raise VisualizeError("--runs needs at least one run")
        self.baseline = self.baseline or next(iter(self.run_paths))
        if self.baseline not in self.run_paths:
            raise VisualizeError(f"--baseline {self.baseline!r} is not one of --runs")


def checkpoints_of(root: str, flag: str) -> list[str]:
    found = sorted(glob.glob(os.path.join(root, "iter_*")))
    found = [p for p in found if os.path.isdir(p) and not p.endswith(".partial")]
    if not found:
        raise VisualizeError(f"{flag}: no iter_* checkpoint directory in {root}")
    return found


def tokens_to_reach(points: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the curve ``[(tokens, loss)]`` first reaches ``target`` (interpolated),
    None if it never does."""
    prev = None
    for tokens, loss in points:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(tokens)
            t0, l0 = prev
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        prev = (tokens, loss)
    return None


def speedup(curves: dict[str, list[tuple[int, float]]], baseline: str) -> dict:
    """Each run's tokens to reach the baseline's final loss, and baseline tokens / those."""
    base_tokens, base_loss = curves[baseline][-1]
    out = {}
    for name, points in curves.items():
        reach = tokens_to_reach(points, base_loss)
        out[name] = {
            "tokens_to_baseline_final_loss": reach,
            "speedup": base_tokens / reach if reach else None,
        }
    return {"baseline": baseline, "baseline_final_loss": base_loss,
            "baseline_tokens": base_tokens, "runs": out}  # fmt: skip


def plot_curves(curves, result, title: str, width: int = 800, height: int = 480) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for name, points in curves.items():
        ax.plot([t for t, _ in points], [v for _, v in points], marker="o", label=name)
    ax.axhline(result["baseline_final_loss"], color="grey", ls=":", lw=1,
               label=f"{result['baseline']} final loss")  # fmt: skip
    for name, r in result["runs"].items():
        if name != result["baseline"] and r["tokens_to_baseline_final_loss"]:
            ax.axvline(r["tokens_to_baseline_final_loss"], color="grey", ls="--", lw=0.8)
            ax.annotate(f"{name}: {r['speedup']:.2f}x fewer tokens",
                        (r["tokens_to_baseline_final_loss"], result["baseline_final_loss"]),
                        textcoords="offset points", xytext=(5, 8), fontsize=8)  # fmt: skip
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def learning_curves(cfg: CurveConfig, device, log=print) -> dict:
    from megatron_slm.atomic_io import write_bytes_atomic, write_json_atomic
    from megatron_slm.evaluation.perplexity import evaluate_perplexity, read_documents
    from megatron_slm.runtime import LoadArgs, load_model, plan_load

    curves: dict[str, list[tuple[int, float]]] = {}
    for name, root in cfg.run_paths.items():
        points = []
        for path in checkpoints_of(root, f"--runs {name}"):
            try:
                args = LoadArgs(load=path, device=cfg.device)
                plan = plan_load(args, tokenizer="required", flag=f"--runs {name}")
                info = plan.checkpoint
                lm = load_model(plan, device)
                docs = read_documents(cfg.data, lm.tokenizer, append_eod=cfg.append_eod)
                res = evaluate_perplexity(lm, docs, seq_length=cfg.seq_length,
                                          max_documents=cfg.max_documents)  # fmt: skip
            except ValueError as e:
                raise VisualizeError(str(e)) from None
            seq = (info.meta.get("config") or {}).get("training", {}).get("seq_length") or 0
            tokens = int(info.meta.get("consumed_samples", 0)) * int(seq)
            points.append((tokens, res.mean_loss))
            log(f"{name:>8s}  {tokens:>10,d} tokens  held-out loss {res.mean_loss:.4f}")
        curves[name] = sorted(points)
    result = speedup(curves, cfg.baseline)
    result["curves"] = {k: [{"tokens": t, "loss": v} for t, v in p] for k, p in curves.items()}
    for name, r in result["runs"].items():
        if name == cfg.baseline:
            continue
        reach = r["tokens_to_baseline_final_loss"]
        if reach is None:
            log(
                f"{name} does not reach {cfg.baseline}'s final loss "
                f"{result['baseline_final_loss']:.4f} within its {curves[name][-1][0]:,} tokens"
            )
        else:
            log(f"{name} reaches {cfg.baseline}'s final loss {result['baseline_final_loss']:.4f} "
                f"after {reach:,.0f} tokens, {cfg.baseline} after {result['baseline_tokens']:,}: "
                f"{r['speedup']:.2f}x fewer tokens")  # fmt: skip
    write_json_atomic(cfg.output + ".json", result)
    title = f"held-out loss on {os.path.basename(cfg.data)}"
    write_bytes_atomic(cfg.output + ".png", plot_curves(curves, result, title))
    log(f"wrote {cfg.output}.json and {cfg.output}.png")
    return result
