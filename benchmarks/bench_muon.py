"""Muon (``--optimizer muon``) against AdamW, same run: what the optimizer step costs, and what
the model learns.

1. ``step``: one optimizer step of the ``--model-preset`` model's weights (default ``tiny``, the
   quickstart's) on this device, built as the trainer builds it (megatron-core's chained
   optimizer), AdamW alone (torch's fused kernel, the anchor) against Muon at the three
   ``--muon-fp32-matmul-prec`` values; median of ``--repeats`` steps after one warm-up. Also
   arithmetic (not measured) for ``--flops-preset`` (default ``tinyllama-1.1b``): the
   Newton-Schulz FLOPs of one step over all its layers' weights, as tokens of training
   (6 x parameters FLOPs each), whole and split over DP ranks as the trainer splits them.
2. ``learning`` (``--learning``): the quickstart's plain run (``--model-preset tiny``, the bundled
   noisy sample, a 512-piece SentencePiece tokenizer trained here, ``--iters`` steps of 16 x 128
   tokens) with AdamW and with Muon (``--muon-extra-scale-factor 0.2``: AdamW's update size;
   Moonlight's recipe) at each ``--lrs`` (the same grid for both, ``--min-lr`` a tenth), then
   ``tools/evaluate.py``'s loss on the held-out clean sample (100 documents) of each one's best
   rate, and the steps Muon at its best rate takes to reach AdamW's best final training loss
   (both smoothed over 20 steps).

    python benchmarks/bench_muon.py                 # the step's cost
    python benchmarks/bench_muon.py --learning      # and the training runs (~7 min on CPU)
    python benchmarks/bench_muon.py --device cuda --model-preset tinyllama-1.1b --num-layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PRECISIONS = ("medium", "high", "highest")


def newton_schulz_flops(rows: int, cols: int, steps: int = 5) -> int:
    """FLOPs of ``steps`` iterations on a ``rows x cols`` matrix (the smaller side m, larger n:
    X X^T 2m^2n, A A 2m^3, B X 2m^2n)."""
    m, n = sorted((rows, cols))
    return steps * (4 * m * m * n + 2 * m**3)


def layer_flops(arch) -> tuple[int, int]:
    """(Newton-Schulz FLOPs, parameters) of one transformer layer of ``arch`` (QKV split into
    its query, key and value blocks, SwiGLU's fc1 as one matrix)."""
    h, ffn = arch.hidden_size, arch.ffn_hidden_size
    kv = arch.kv_channels or h // arch.num_attention_heads
    groups = arch.num_query_groups or arch.num_attention_heads
    q_rows, kv_rows = arch.num_attention_heads * kv, groups * kv
    fc1_rows = 2 * ffn if arch.activation == "swiglu" else ffn
    mats = [(q_rows, h), (kv_rows, h), (kv_rows, h), (h, q_rows), (fc1_rows, h), (h, ffn)]
    return sum(newton_schulz_flops(*m) for m in mats), sum(r * c for r, c in mats)


def _step_times(arch, precision: str | None, repeats: int, device: str) -> list[float]:
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_slm.models import ModelBuildOptions, build_model
    from megatron_slm.training.config import parse_config
    from megatron_slm.training.optimizer import OptimizerStep, build_optimizer

    (model,) = build_model(arch, ModelBuildOptions(), device=torch.device(device))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    muon = (
        () if precision is None else ("--optimizer", "muon", "--muon-fp32-matmul-prec", precision)
    )
    cfg = parse_config(["--train-iters", "10", "--lr", "1e-3", *muon])
    optimizer, _ = build_optimizer(cfg, [ddp], torch.float32, train_iters=10)
    step = OptimizerStep(optimizer, 1.0, torch.device(device))
    for p in ddp.module.parameters():
        p.main_grad.normal_()
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def measure_steps(arch, repeats: int, device: str) -> dict:
    from megatron_slm import launch

    launch.initialize(device=device)  # one rank
    out = {}
    for precision in (None, *PRECISIONS):
        times = _step_times(arch, precision, repeats, device)
        out["adamw" if precision is None else f"muon {precision}"] = statistics.median(times)
    launch.shutdown()
    return out


def _train(python: str, out: str, name: str, data: str, tok: str, iters: int, *extra) -> list:
    log = os.path.join(out, f"{name}.jsonl")
    cmd = [python, "-m", "megatron_slm.pretrain", "--model-preset", "tiny",
           "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok,
           "--data-path", data, "--seq-length", "128", "--micro-batch-size", "4",
           "--global-batch-size", "16", "--train-iters", str(iters), "--lr", "3e-3",
           "--min-lr", "3e-4", "--lr-warmup-iters", "10", "--log-interval", "50",
           "--eval-interval", "0", "--split", "100,0,0", "--device", "cpu",
           "--save", os.path.join(out, name), "--log-loss-file", log, *extra]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    with open(log) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def _smoothed(losses: list, window: int = 20) -> list:
    return [statistics.fmean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]


def learning(python: str, iters: int, lrs: list[str]) -> dict:
    """{(optimizer, lr): smoothed training losses}, and {optimizer: held-out loss} of each
    optimizer's best learning rate (by its final smoothed loss)."""
    sample = os.path.join(REPO, "examples", "sample_data")
    with tempfile.TemporaryDirectory() as out:
        heldout = os.path.join(out, "clean_heldout.jsonl")
        with open(os.path.join(sample, "clean.jsonl")) as f:
            lines = f.readlines()
        with open(heldout, "w") as f:
            f.writelines(lines[-100:])
        tok = os.path.join(out, "tok")
        run = lambda *a: subprocess.run([python, *a], check=True, cwd=REPO,  # noqa: E731
                                        stdout=subprocess.DEVNULL)  # fmt: skip
        run("tools/train_tokenizer.py", "--input", os.path.join(sample, "clean.jsonl"),
            "--model-prefix", tok, "--vocab-size", "512")  # fmt: skip
        run("tools/preprocess_data.py", "--input", os.path.join(sample, "noisy.jsonl"),
            "--output-prefix", os.path.join(out, "noisy"), "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", f"{tok}.model",
            "--append-eod")  # fmt: skip
        data = os.path.join(out, "noisy_text_document")
        optimizers = {
            "adamw": (),
            # CPU: fp32 iterations are faster than bf16 ones (the step figures above)
            "muon": ("--optimizer", "muon", "--muon-extra-scale-factor", "0.2",
                     "--muon-fp32-matmul-prec", "highest"),
        }  # fmt: skip
        curves, heldout_losses = {}, {}
        for name, extra in optimizers.items():
            for lr in lrs:
                schedule = ("--lr", lr, "--min-lr", f"{float(lr) / 10:g}")
                losses = _train(python, out, f"{name}_{lr}", data, f"{tok}.model", iters,
                                *extra, *schedule)  # fmt: skip
                curves[name, lr] = _smoothed(losses)
            best = min(lrs, key=lambda lr: curves[name, lr][-1])
            report = os.path.join(out, f"eval_{name}.json")
            run("tools/evaluate.py", "--load", os.path.join(out, f"{name}_{best}"),
                "--perplexity-data", f"clean={heldout}", "--seq-length", "128", "--append-eod",
                "--output", report, "--micro-batch-size", "16")  # fmt: skip
            with open(report) as f:
                heldout_losses[name] = (best, json.load(f)["perplexity"][0]["mean_loss"])
        return curves, heldout_losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-preset", default="tiny")
    p.add_argument("--num-layers", type=int, help="the step's model: fewer layers of the preset")
    p.add_argument("--flops-preset", default="tinyllama-1.1b")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--learning", action="store_true")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--lrs", default="6e-3,1.2e-2,2.4e-2", help="the --lr grid of both")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

    import dataclasses

    from megatron_slm.models import get_preset

    arch = get_preset(args.model_preset)
    if args.num_layers:
        arch = dataclasses.replace(arch, num_layers=args.num_layers)
    steps = measure_steps(arch, args.repeats, args.device)
    anchor = steps["adamw"]
    print(f"optimizer step, {args.model_preset}, {arch.num_layers} layers ({args.device}), "
          f"median of {args.repeats}:")  # fmt: skip
    for name, seconds in steps.items():
        print(f"  {name:14s} {seconds * 1e3:9.2f} ms  {seconds / anchor:6.2f}x AdamW")

    arch = get_preset(args.flops_preset)
    ns, params = layer_flops(arch)
    total = ns * arch.num_layers
    model_params = params * arch.num_layers + 2 * arch.vocab_size * arch.hidden_size
    tokens = total / (6 * model_params)
    print(f"arithmetic, {args.flops_preset}: Newton-Schulz {total:.2e} FLOP per step "
          f"(5 quintic steps, every layer) = the forward and backward of {tokens:,.0f} "
          f"tokens; split over DP 8: {tokens / 8:,.0f}, DP 64: {tokens / 64:,.0f} tokens "
          "per rank")  # fmt: skip

    if args.learning:
        lrs = args.lrs.split(",")
        curves, heldout = learning(sys.executable, args.iters, lrs)
        print(f"learning, {args.iters} steps of 2048 tokens: final training loss (smoothed over "
              "20 steps) at each --lr (--min-lr a tenth)")  # fmt: skip
        for name in ("adamw", "muon"):
            finals = "  ".join(f"{lr}: {curves[name, lr][-1]:.4f}" for lr in lrs)
            best, held = heldout[name]
            print(f"  {name:6s} {finals}  | best {best}: held-out clean loss {held:.4f}")
        adamw = curves["adamw", heldout["adamw"][0]]
        muon = curves["muon", heldout["muon"][0]]
        reached = next((i + 1 for i, loss in enumerate(muon) if loss <= adamw[-1]), None)
        if reached:
            print(f"  Muon (best --lr) reaches AdamW's best final training loss at step "
                  f"{reached} of {args.iters}: {args.iters / reached:.2f}x fewer "
                  "tokens")  # fmt: skip
        else:
            print("  Muon (best --lr) does not reach AdamW's best final training loss")
    return 0


if __name__ == "__main__":
    sys.exit(main())
