"""lm-eval task configs shipped with megatron-slm (Rho-1's math protocol, a local QA task).

``python -m megatron_slm.evaluation.tasks`` prints this directory, for ``lm_eval --include_path``;
``tools/evaluate.py --lm-eval-tasks`` includes it by itself.

* ``gsm8k_rho1``: GSM8K test, 8-shot chain of thought (the prompt of math-evaluation-harness,
  which Rho-1 used), greedy, answer = last ``\\boxed{}`` / "The answer is" / last number, exact
  match after normalisation (``megatron_slm.evaluation.math_answer``).
* ``math_rho1``: MATH test, 4-shot chain of thought (same harness), boxed answers.
* ``rho1_math``: both (a tag).
* ``gsm8k_rho1_tora``, ``math_rho1_tora`` (tag ``rho1_math_tora``): Rho-1's tool-integrated
  protocol (math-evaluation-harness's ``tora`` prompt layout, our own examples in
  ``*_tora.txt``): up to 4 rounds of generation and sandboxed execution of the model's Python
  (``megatron_slm.evaluation.tora``); ``generation_kwargs.tool_rounds`` is read by the
  ``megatron-slm`` model only.
* ``qa_local``: a local JSONL of ``question``/``answer`` records, 0-shot
  ``Question: ... Answer:``, the answer extracted like the math tasks.

Data: the standard datasets (``openai/gsm8k``, ``EleutherAI/hendrycks_math``) through
``datasets`` when reachable; a local JSONL instead with ``--metadata '{"gsm8k_path": F}'`` (GSM8K
records: ``question``, ``answer`` ending in ``#### N``), ``math_path`` (``problem``,
``solution`` with a boxed answer) or ``qa_path``, or the environment variables
``MEGATRON_SLM_GSM8K``, ``MEGATRON_SLM_MATH``, ``MEGATRON_SLM_QA``.
"""

import os

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))
