"""Run many entry-point invocations as real processes cheaply: import torch, megatron-core and the
package once, then ``fork`` one child per case that runs the entry point exactly as ``python
tools/X.py ...`` / ``python -m megatron_slm.pretrain ...`` would (``__main__``, ``sys.exit``), with
its own stdout/stderr files and exit status.

    python -m tests.functional.bad_input_driver CASES.json RESULTS.json

CASES.json: ``[{"entry": "tools/score_corpus.py" | "megatron_slm.pretrain", "argv": [...],
"cwd": "..."}]``; RESULTS.json: ``[{"returncode", "stdout", "stderr"}]`` in the same order.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time

# Heavy imports paid once in the parent; every child inherits them (copy-on-write).
import torch  # noqa: F401
from megatron.core.datasets import indexed_dataset  # noqa: F401

import megatron_slm.checkpoint  # noqa: F401
import megatron_slm.training.loop  # noqa: F401


def _child(case: dict, out: str, err: str) -> None:
    try:
        os.chdir(case.get("cwd") or os.getcwd())
        for fd, path in ((1, out), (2, err)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        entry, argv = case["entry"], case["argv"]
        code = 0
        try:
            if entry.endswith(".py"):
                sys.argv = [entry, *argv]
                sys.path.insert(0, os.path.dirname(os.path.abspath(entry)))
                runpy.run_path(entry, run_name="__main__")
            else:
                sys.argv = [entry, *argv]
                runpy.run_module(entry, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int | None):
                print(e.code, file=sys.stderr)
        except BaseException:  # what the interpreter would do: traceback, status 1
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    finally:
        os._exit(3)  # never return into the parent's code


def main() -> None:
    cases = json.load(open(sys.argv[1]))
    tmp = os.path.dirname(os.path.abspath(sys.argv[2]))
    results = []
    for i, case in enumerate(cases):
        out, err = os.path.join(tmp, f"case{i}.out"), os.path.join(tmp, f"case{i}.err")
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            _child(case, out, err)
        _, status = os.waitpid(pid, 0)
        results.append(
            {
                "seconds": time.perf_counter() - t0,
                "returncode": os.waitstatus_to_exitcode(status),
                "stdout": open(out, errors="replace").read(),
                "stderr": open(err, errors="replace").read(),
            }
        )
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
