"""Tool-integrated reasoning (ToRA), Rho-1's second math protocol, as math-evaluation-harness runs
it with its ``tora`` prompt type.

The model writes reasoning and a fenced ```` ```python ```` block; generation stops at
```` ```output ```` (or at ``\\n\\n---``, the few-shot separator). When a round's output has no
``boxed`` answer and ends with a closing fence, the last Python block of the completion so far is
run in the sandbox (:mod:`megatron_slm.evaluation.sandbox`), and its report is appended as
```` \\n```output\\n{report}\\n```\\n ```` before the next round; at most ``rounds`` rounds (4),
and after the last one ``\\nReach max function call limit.`` is appended. The report is the
program's stdout (stripped), else ``Done`` for a silent success, the last line of stderr for an
error (``ZeroDivisionError: division by zero``), ``Timeout Error`` past a limit, and is cut to
400 characters (first and last 200). The completion (all rounds) is graded like the
chain-of-thought tasks: last ``\\boxed{}``.

Every round is one batched generation over the questions still running, so questions share
batches; programs of a round run concurrently (``Sandbox.run_many``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from megatron_slm.evaluation.sandbox import RunResult

STOP = ("```output", "\n\n---")
"""Stop sequences of the protocol (besides the model's end-of-text strings)."""
MAX_ROUNDS_NOTE = "\nReach max function call limit."
REPORT_CHARS = 400
_PROGRAM = re.compile(r"```python\n(.*?)```", re.DOTALL)


def last_program(completion: str) -> str | None:
    """The body of the last closed ```` ```python ```` block, or None."""
    blocks = _PROGRAM.findall(completion)
    return blocks[-1] if blocks else None


def wants_tool(round_output: str) -> bool:
    """A round asks for execution when it ends with a closing fence and has no boxed answer."""
    out = round_output.rstrip()
    return "boxed" not in out and out.endswith("```")


def _truncate(text: str, limit: int = REPORT_CHARS) -> str:
    half = limit // 2
    return text if len(text) <= limit else text[:half] + "..." + text[-half:]


def report(result: RunResult) -> str:
    """What the model sees of one run (math-evaluation-harness's rules, see the module doc)."""
    out = result.stdout.strip()
    if result.status == "ok":
        text = out or "Done"
    elif result.status == "timeout":
        text = "Timeout Error"
    elif result.status == "output-limit":
        text = out
    else:
        lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
        text = lines[-1].strip() if lines else f"Killed (status {result.returncode})"
    return _truncate(text)


def tool_loop(
    prompts: Sequence[str],
    generate: Callable[[list[str]], list[str]],
    execute: Callable[[list[str]], list[RunResult]],
    rounds: int = 4,
) -> list[str]:
    """Completions (everything after each prompt) of the ToRA interaction.

    ``generate(contexts)`` returns one round's output per context (cut at the stop sequences,
    as lm-eval's ``generate_until`` does); it is called once per round with the questions that
    are still running; ``execute(programs)`` runs a round's programs (``Sandbox.run_many``)."""
    completions = [""] * len(prompts)
    running = list(range(len(prompts)))
    for r in range(rounds):
        if not running:
            break
        outs = generate([prompts[i] + completions[i] for i in running])
        asking, programs = [], []
        for i, out in zip(running, outs):
            out = out.rstrip()
            completions[i] += out
            program = last_program(completions[i]) if wants_tool(out) else None
            if program is not None:
                asking.append(i)
                programs.append(program)
        for i, result in zip(asking, execute(programs)):
            completions[i] += f"\n```output\n{report(result)}\n```\n"
            if r == rounds - 1:
                completions[i] += MAX_ROUNDS_NOTE
        running = asking
    return completions
