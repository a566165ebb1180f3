"""lm-evaluation-harness tasks on a loaded model (``tools/evaluate.py --lm-eval-tasks``).

megatron-slm's own tasks (``megatron_slm/evaluation/tasks``: Rho-1's GSM8K/MATH protocol, the
local QA task) are always on the include path; lm-eval's built-in tasks work too where their
datasets can be read. lm-eval is imported only here, when tasks are asked for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from megatron_slm.errors import ConfigError
from megatron_slm.runtime import LoadedModel


def parse_metadata(text: str | None, flag: str = "--lm-eval-metadata") -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: must be a JSON object, got {type(value).__name__}")
    return value


def run_lm_eval(
    m: LoadedModel,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    include_paths: Sequence[str] = (),
    metadata: dict | None = None,
    log_samples: bool = False,
) -> dict | None:
    """lm-eval's ``simple_evaluate`` with ``m`` as the ``megatron-slm`` model: its result dict
    (``results`` per task, ...), on the process that writes results; None on the others."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(
            "--lm-eval-tasks needs lm-eval (pip install 'megatron-slm[lm-eval]')"
        ) from None
    from megatron_slm.evaluation.lm_eval_model import MegatronSLMLM

    metadata = metadata or {}
    manager = task_manager(tasks, include_paths, metadata)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError(f"--lm-eval-tasks: unknown task(s) {', '.join(unknown)}")
    return lm_eval.simple_evaluate(
        model=MegatronSLMLM(model=m, batch_size=batch_size),
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        metadata=metadata,
    )


def task_manager(tasks: Sequence[str], include_paths: Sequence[str], metadata: dict):
    """lm-eval's ``TaskManager`` for ``tasks``: our tasks, then ``include_paths``'. lm-eval
    indexes every YAML of its own library (thousands: about 10 s of CPU per process) unless told
    not to: it is read unless every name is a task there (which would override lm-eval's) or one
    of our own tags. A group may list built-in tasks, and a tag on a user's path may also be one
    of lm-eval's (then it holds lm-eval's tasks too)."""
    from lm_eval.tasks import TaskManager

    from megatron_slm.evaluation.tasks import TASKS_DIR

    paths = [TASKS_DIR, *include_paths]
    manager = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    rest = set(tasks) - set(manager.all_subtasks)
    if not rest:
        return manager
    if rest <= set(TaskManager(include_path=TASKS_DIR, include_defaults=False).all_tags):
        return manager
    return TaskManager(include_path=paths, metadata=metadata)
