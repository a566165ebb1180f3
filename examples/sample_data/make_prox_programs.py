"""Write ProX programs for the noisy sample corpus: the rule-based labeller of the quickstart.

For every document of ``noisy.jsonl`` it writes a chunk-level program that removes the noise lines
``make_sample_corpus.py`` inserted (boilerplate, hex strings, runs of random consonant words),
adjacent ones as one ``remove_lines`` range, and a document-level ``drop_doc()`` for documents
that are more than half noise (by words). The quickstart distils these programs into a refining
model (``tools/prox_annotate.py --programs``, then SFT); ``tools/prox_refine.py apply`` applies them
directly.

    python examples/sample_data/make_prox_programs.py   # writes noisy_programs.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_sample_corpus import NOISE  # noqa: E402

HEX = r"[0-9a-f]{16,48}"
GIBBERISH = r"[qwxzjkvbpy]{2,7}(?: [qwxzjkvbpy]{2,7}){3,}"
NOISE_LINE = re.compile("|".join([*(re.escape(n) for n in NOISE), HEX, GIBBERISH]))


def noise_ranges(lines: list[str]) -> list[tuple[int, int]]:
    """``(first, last)`` line numbers of each run of noise lines."""
    ranges: list[tuple[int, int]] = []
    for i, line in enumerate(lines):
        if NOISE_LINE.fullmatch(line):
            if ranges and ranges[-1][1] == i - 1:
                ranges[-1] = (ranges[-1][0], i)
            else:
                ranges.append((i, i))
    return ranges


def program_for(text: str) -> dict:
    lines = text.split("\n")
    ranges = noise_ranges(lines)
    noise_words = sum(len(lines[i].split()) for a, b in ranges for i in range(a, b + 1))
    doc_program = "drop_doc()" if noise_words > 0.5 * len(text.split()) else "keep_doc()"
    calls = [f"remove_lines(line_start={a}, line_end={b})" for a, b in ranges]
    return {"doc_program": doc_program, "chunk_program": "\n".join(calls) or "keep_chunk()"}


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default=os.path.join(here, "noisy.jsonl"))
    p.add_argument("--output", default=os.path.join(here, "noisy_programs.jsonl"))
    args = p.parse_args(argv)
    with open(args.input, encoding="utf-8") as f, open(args.output + ".tmp", "w") as g:
        for line in f:
            record = json.loads(line)
            g.write(json.dumps({"id": record["id"], **program_for(record["text"])}) + "\n")
    os.replace(args.output + ".tmp", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
