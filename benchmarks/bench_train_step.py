"""Training step time: selective (sidecar, online reference) and distillation against plain
training, same run.

Runs ``python -m megatron_slm.pretrain`` as users do on a synthetic corpus: plain causal LM (the
anchor; with ``--megatron-loss`` also plain with megatron-core's cross entropy), ``--slm-ratio
0.6`` with reference losses from a sidecar written by ``tools/score_corpus.py``, and with the
online reference model (on CUDA also with the reference's document attention on a dense mask
instead of FlexAttention), and knowledge distillation from a teacher of the same size
(``--export-kd-teacher-load``: its forward and the KL divergence beside the step), and one
multi-token prediction head (``--mtp-num-layers 1``: one more layer and output layer, counted in
its TFLOP/s). Reports the
median step time of the steps after warm-up, ratios to
plain, tokens/s and TFLOP/s; on CUDA, MFU too. Also times the scorer on the training corpus
(``--docs``), so its tokens/s can be compared with training's (forward only: about 3x).

The trainer reads its statistics back (a host wait) every ``--log-interval`` steps only, and a
step's ``step_seconds`` is the mean over the steps read together; the warm-up is a whole number
of such windows, so the measured windows hold no warm-up step.

    python benchmarks/bench_train_step.py                        # tiny model on CPU
    python benchmarks/bench_train_step.py --device cuda --model-preset tinyllama-1.1b \\
        --num-layers 8 --seq-length 2048 --micro-batch-size 4 --bf16 \\
        --iters 25 --warmup 5 --rounds 1                         # one pass per variant

Targets (issue 5, CPU tiny model): sidecar <= 1.05x plain, online <= 1.5x plain; distillation
<= 1.5x plain (a same-size teacher's forward is about a third of a step); one MTP head <= 1.5x
plain (its layer, projection and logits: 1.37x the tiny model's FLOPs at 256 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_corpus(directory: str, docs: int, doc_len: int, vocab: int) -> str:
    from megatron_slm.data import preprocess_corpus

    rng = np.random.default_rng(0)
    path = os.path.join(directory, "bench.jsonl")
    with open(path, "w") as f:
        for _ in range(docs):
            start = int(rng.integers(0, vocab - 1))
            ids = (start + 7 * np.arange(doc_len) + rng.integers(0, 3, doc_len)) % (vocab - 1)
            f.write(json.dumps({"text": " ".join(map(str, ids))}) + "\n")
    out = preprocess_corpus([path], os.path.join(directory, "bench"), "NullTokenizer",
                            vocab_size=vocab, append_eod=True)  # fmt: skip
    return out["text"]


def run(cmd: list[str], env: dict, fatal: bool = True) -> str | None:
    """The command's output; on failure its tail on stderr, then exit (``fatal``) or None."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        message = f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if fatal:
            sys.exit(message)
        print(message, file=sys.stderr, flush=True)
        return None
    return proc.stdout + proc.stderr


def _percent(x: float) -> str:
    return "-" if x != x else f"{x:.1%}"  # NaN: no peak known for the device (cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-preset", default="tiny")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--log-interval", type=int, default=5, help="steps per host read (window)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; best kept")
    p.add_argument(
        "--docs",
        type=int,
        default=None,
        help="documents of 300 tokens in the corpus (default: 1200 on cpu, 8000 on cuda): the "
        "scorer's rate needs several of its 1000-document chunks, since its first chunk is packed "
        "before any forward and a GPU warms up inside its timed loop (on cpu, 400 documents, one "
        "chunk, measured it at 2.35x training, 1200 at 3.32x)",
    )
    p.add_argument(
        "--megatron-loss",
        action="store_true",
        help="also plain training with --cross-entropy-impl megatron (megatron-core's loss)",
    )
    args = p.parse_args()
    if args.warmup % args.log_interval or args.iters % args.log_interval:
        p.error("--warmup and --iters must be multiples of --log-interval (whole windows)")

    # the repository first, then whatever the caller had (run.sh's fallback wheel folder)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    )
    work = tempfile.mkdtemp(prefix="bench_train_step_")
    docs = args.docs or (8000 if args.device == "cuda" else 1200)
    prefix = make_corpus(work, docs, 300, args.vocab_size)
    common = [
        "--data-path", prefix, "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(args.vocab_size), "--model-preset", args.model_preset,
        "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.global_batch_size), "--device", args.device,
        "--eval-interval", "0", "--log-interval", str(args.log_interval), "--split", "100,0,0",
    ]  # fmt: skip
    if args.num_layers:
        common += ["--num-layers", str(args.num_layers)]
    if args.bf16:
        common += ["--bf16"]
    py = [sys.executable, "-m", "megatron_slm.pretrain", *common]

    ref = os.path.join(work, "ref")
    run([*py, "--train-iters", "2", "--save", ref], env)
    score_cmd = [
        sys.executable, os.path.join(REPO, "tools", "score_corpus.py"), "--data-prefix", prefix,
        "--load", ref, "--seq-length", str(args.seq_length), "--device", args.device,
        "--micro-batch-size", str(args.micro_batch_size * 2), "--dtype", "float32",
    ]  # fmt: skip
    # The scorer's own report: corpus tokens per second of its scoring loop (start-up excluded).
    output = run(score_cmd, env, fatal=False) or ""
    for line in output.splitlines():
        if "FlexAttention failed" in line:
            print(f"scorer: {line.strip()}", flush=True)
    report = re.search(r"scored .*?: .*? \(([\d,]+) tokens/s\)", output)
    score_tps = float(report.group(1).replace(",", "")) if report else float("nan")
    print(f"scorer: {score_tps:,.0f} tokens/s", flush=True)

    online = ["--slm-ratio", "0.6", "--slm-ref-source", "online", "--slm-ref-load", ref]
    variants = {  # name: (flags, environment)
        "plain (anchor)": ([], {}),
        "slm 0.6 sidecar": (["--slm-ratio", "0.6"], {}),
        "slm 0.6 online": (online, {}),
        "distill (same-size teacher)": (["--export-kd-teacher-load", ref], {}),
        "mtp (1 head)": (["--mtp-num-layers", "1"], {}),
    }
    if args.megatron_loss:
        variants["plain, megatron-core loss"] = (["--cross-entropy-impl", "megatron"], {})
    if args.device == "cuda":
        # The online reference's document attention runs on FlexAttention by default on CUDA;
        # the dense-mask SDPA it replaced, for comparison (models/document_mask.py).
        variants["slm 0.6 online, dense mask"] = (
            online,
            {"MEGATRON_SLM_DOCUMENT_ATTENTION": "dense"},
        )
    # Rounds interleave the variants; each variant keeps its fastest round (the machine is shared
    # and noisy: one pass in a fixed order measured the second variant 19% slow, a profile 4% fast),
    # and the order rotates so no variant always runs right after another.
    results = {}
    names = list(variants)
    for round_ in range(args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]  # rotate the order
        for i, name in enumerate(order):
            extra, extra_env = variants[name]
            log = os.path.join(work, f"{round_}_{i}.jsonl")
            cmd = [*py, "--train-iters", str(args.iters), "--log-loss-file", log, *extra]
            # A variant that fails is reported and the others go on (a GPU lease is short).
            output = run(cmd, {**env, **extra_env}, fatal=False)
            if output is None:
                results.setdefault(name, None)
                continue
            for line in output.splitlines():  # a fallback would measure dense attention as flex
                if "FlexAttention failed" in line:
                    print(f"round {round_} {name}: {line.strip()}", flush=True)
            steps = [json.loads(line) for line in open(log)][args.warmup :]
            measured = (
                statistics.median(s["step_seconds"] for s in steps),
                statistics.median(s["tokens_per_second"] for s in steps),
                statistics.median(s["tflops_per_device"] for s in steps),
                statistics.median(s.get("mfu", float("nan")) for s in steps),
            )
            # everything measured, as it comes: a run cut short by a timeout keeps its figures
            print(
                f"round {round_} {name}: {measured[0] * 1e3:.1f} ms/step, "
                f"{measured[1]:,.0f} tokens/s, MFU {_percent(measured[3])}",
                flush=True,
            )
            if results.get(name) is None or measured[0] < results[name][0]:
                results[name] = measured
    nan = float("nan")
    anchor = (results.get("plain (anchor)") or (nan,))[0]
    print(f"\nmodel {args.model_preset}, seq {args.seq_length}, global batch "
          f"{args.global_batch_size}, device {args.device}, "
          f"best of {args.rounds} rounds\n")  # fmt: skip
    print("| variant | step ms | vs plain | tokens/s | TFLOP/s/device | MFU |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, measured in results.items():
        if measured is None:
            print(f"| {name} | failed (stderr above) | | | | |")
            continue
        sec, tps, tflops, mfu = measured
        mfu_text = _percent(mfu)
        print(f"| {name} | {sec * 1e3:.1f} | {sec / anchor:.3f}x | {tps:,.0f} | "
              f"{tflops:.3f} | {mfu_text} |")  # fmt: skip
    train_tps = (results.get("plain (anchor)") or (nan, nan))[1]
    ratio = score_tps / train_tps
    print(f"\nscoring (tools/score_corpus.py, same model and sequence length): "
          f"{score_tps:,.0f} tokens/s = {ratio:.2f}x training tokens/s")  # fmt: skip
    if score_tps != score_tps or None in results.values():
        sys.exit(1)  # what failed is on stderr above


if __name__ == "__main__":
    main()
