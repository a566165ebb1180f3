"""ProX executor throughput against a plain string-slicing reference, on a synthetic corpus.

    python benchmarks/bench_prox_executor.py [--mb 100] [--repeat 3]

Builds ``--mb`` MB of synthetic web-like documents (lines of pseudo-words, boilerplate lines) with
one chunk-level program each, in the canonical spellings the released ProX models emit
(``remove_lines(line_start=i, line_end=j)``, ``normalize(source_str="..", target_str="..")``,
``keep_chunk()``), then times, on the documents already in memory:

- ``reference``: the string-slicing executor written below, the way GAIR-NLP/ProX parses programs
  (``index("(")``, ``split(",")``, ``split("=")``, a set of line numbers), with the same
  acceptance rule. It is wrong for strings containing ``,`` ``=`` or ``)``; the corpus avoids them
  so both executors must agree, which the script checks on every document.
- ``executor``: ``megatron_slm.refine.executor.execute_chunk_program`` (``ast`` parser with a fast
  path for canonical lines, interval merging, list slicing).

Prints documents/s and MB/s of each (best of ``--repeat``) and the ratio executor / reference.
Acceptance (issue 14): ratio >= 1.0.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

try:
    import megatron_slm  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slm.refine.executor import AcceptanceRule, execute_chunk_program  # noqa: E402

BOILERPLATE = [
    "Home | About | Contact | Login | Sign up",
    "Copyright 2024 All rights reserved. Terms of use. Privacy policy.",
    "Share on Facebook Share on Twitter Share by email",
    "Click here to subscribe!!! Limited offer",
]


def make_corpus(megabytes: float, seed: int = 0) -> list[tuple[str, str]]:
    """``(document, program)`` pairs totalling about ``megabytes`` MB of text."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(1, 9)))
             for _ in range(3000)]  # fmt: skip
    pairs, size, target = [], 0, int(megabytes * 1e6)
    while size < target:
        n_lines = rng.randint(5, 80)
        lines = []
        for _ in range(n_lines):
            if rng.random() < 0.15:
                lines.append(rng.choice(BOILERPLATE))
            else:
                lines.append(" ".join(rng.choices(vocab, k=rng.randint(3, 25))))
        ops = []
        for _ in range(rng.choice([0, 1, 1, 2, 3, 5])):
            start = rng.randint(0, n_lines + 2)  # sometimes out of range (an error)
            ops.append(f"remove_lines(line_start={start}, line_end={start + rng.randint(0, 6)})")
        if rng.random() < 0.3:
            word = rng.choice(vocab)
            ops.append(f'normalize(source_str="{word} ", target_str="{word.upper()} ")')
        if not ops:
            ops.append("keep_chunk()")
        rng.shuffle(ops)
        text = "\n".join(lines)
        pairs.append((text, "\n".join(ops)))
        size += len(text.encode())
    return pairs


# ---------------------------------------------------------------------------------------------
# the plain string-slicing reference
# ---------------------------------------------------------------------------------------------
def reference_execute(text: str, program: str, rule: AcceptanceRule) -> str | None:
    """Refined text, the original, or None (dropped); ProX's parsing by slicing."""
    errors = 0
    to_remove: set[int] = set()
    intervals = []
    work = text
    for op in program.strip(" ").split("\n"):
        if op.startswith("remove_lines"):
            try:
                params = op[op.index("(") + 1 : op.index(")")].split(",")
                start = int(params[0].split("=")[1])
                end = int(params[1].split("=")[1])
            except (ValueError, IndexError):
                errors += 1
                continue
            intervals.append((start, end))
            to_remove.update(range(start, end + 1))
        elif op.startswith("normalize"):
            try:
                params = op[op.index("(") + 1 : op.index(")")].split(",")
                source = params[0].split("=")[1].strip('"')
                target = params[1].split("=")[1].strip().strip('"')
            except (ValueError, IndexError):
                errors += 1
                continue
            if source not in ("", " "):
                work = work.replace(source, target)
            else:
                errors += 1
        elif op.strip() not in ("keep_chunk()", ""):
            errors += 1
    lines = work.split("\n")
    for start, end in intervals:  # one error per out-of-range call
        if start >= len(lines) or end >= len(lines):
            errors += 1
    refined = "\n".join(line for i, line in enumerate(lines) if i not in to_remove)
    before, after = len(text.split()), len(refined.split())
    if before == 0:
        return None
    if after / before <= rule.drop_ratio and errors < rule.max_errors:
        return None
    if after <= rule.drop_words:
        return None
    return refined if errors < rule.max_errors else text


def ours(text: str, program: str, rule: AcceptanceRule) -> str | None:
    result = execute_chunk_program(text, program, rule)
    return None if result.dropped else result.text


def timed(fn, pairs, rule) -> tuple[float, list]:
    start = time.perf_counter()
    out = [fn(t, p, rule) for t, p in pairs]
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mb", type=float, default=100.0, help="corpus size in MB")
    p.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = p.parse_args(argv)

    pairs = make_corpus(args.mb)
    megabytes = sum(len(t.encode()) for t, _ in pairs) / 1e6
    rule = AcceptanceRule()
    print(f"corpus: {len(pairs):,} documents, {megabytes:.1f} MB")
    best = {"reference": float("inf"), "executor": float("inf")}
    for _ in range(args.repeat):  # interleaved, to share the machine's noise
        for name, fn in (("reference", reference_execute), ("executor", ours)):
            seconds, out = timed(fn, pairs, rule)
            best[name] = min(best[name], seconds)
            if name == "reference":
                expected = out
            elif out != expected:
                bad = next(i for i, (a, b) in enumerate(zip(out, expected)) if a != b)
                print(f"MISMATCH at document {bad}: program {pairs[bad][1]!r}")
                return 1
    kept = sum(o is not None for o in expected)
    print(f"both executors agree on all documents ({kept:,} kept)")
    for name, seconds in best.items():
        print(
            f"{name:>9}: {seconds:7.2f} s  {len(pairs) / seconds:12,.0f} docs/s  "
            f"{megabytes / seconds:8.1f} MB/s"
        )
    ratio = best["reference"] / best["executor"]
    print(f"ratio executor / reference throughput: {ratio:.2f} ({'PASS' if ratio >= 1 else 'FAIL'}"
          f": >= 1.0)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
