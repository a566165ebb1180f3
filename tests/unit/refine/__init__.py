"""Shared helpers of the refine tests."""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def run_tool(argv, capsys):
    """``tools/prox_refine.py main(argv)`` in-process: (exit status, last stderr line)."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import prox_refine
    finally:
        sys.path.pop(0)
    code = prox_refine.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
