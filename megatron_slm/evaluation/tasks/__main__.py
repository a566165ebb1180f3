"""Print the directory of megatron-slm's lm-eval tasks (for ``lm_eval --include_path``)."""

from megatron_slm.evaluation.tasks import TASKS_DIR

print(TASKS_DIR)
