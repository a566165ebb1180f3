"""Write ProX programs for the noisy sample corpus (the quickstart's ``apply`` step).

Stand-in for a trained refining model until the quickstart trains one: for every document of
``noisy.jsonl`` it writes a chunk-level program that deletes the noise ``make_sample_corpus.py``
inserted (boilerplate sentences, hex strings, runs of random consonant words) with ``normalize``
calls, and a document-level ``drop_doc()`` for documents that are more than half noise. The
boilerplate contains commas and ``!`` inside the strings: the programs exercise the literal parser.

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

HEX = r"\b[0-9a-f]{16,48}\b"
GIBBERISH = r"\b[qwxzjkvbpy]{2,7}(?: [qwxzjkvbpy]{2,7}){3,}\b"  # adjacent runs merge
PATTERN = re.compile("|".join([*(re.escape(n) for n in NOISE), HEX, GIBBERISH]))


def program_for(text: str) -> dict:
    pieces = []
    for m in PATTERN.finditer(text):
        start, end = m.span()
        # take one neighbouring space with the piece, so no double space is left behind
        if end < len(text) and text[end] == " ":
            end += 1
        elif start > 0 and text[start - 1] == " ":
            start -= 1
        pieces.append(text[start:end])
    noise_words = sum(len(p.split()) for p in pieces)
    doc_program = "drop_doc()" if noise_words > 0.5 * len(text.split()) else "keep_doc()"
    lines = [f'normalize(source_str={json.dumps(p)}, target_str="")' for p in dict.fromkeys(pieces)]
    return {"doc_program": doc_program, "chunk_program": "\n".join(lines) or "keep_chunk()"}


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
