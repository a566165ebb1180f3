"""Where the trainer's scalars go: TensorBoard, and a Weights & Biases run with ``--wandb-project``
(Megatron-LM's flags), the same tags at the same steps.

W&B takes one row per step (``run.log(row, step=...)``) and drops a step lower than one it has
seen, so :class:`WandbWriter` gathers a step's scalars and logs them when the next step begins,
and at ``flush``; the trainer writes steps in increasing order.
"""

from __future__ import annotations

import dataclasses
import os


class ScalarWriters:
    """``add_scalar(tag, value, step)`` to every writer (TensorBoard's ``SummaryWriter``,
    :class:`WandbWriter`); false when there is none."""

    def __init__(self, writers: list) -> None:
        self.writers = writers

    def __bool__(self) -> bool:
        return bool(self.writers)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for writer in self.writers:
            writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def run_config(cfg) -> dict:
    """The run's flags, one level deep (W&B's config panel): ``{field: value}`` of every group,
    values JSON can hold kept, others as text."""
    flat = {}
    for group in dataclasses.fields(cfg):
        for name, value in dataclasses.asdict(getattr(cfg, group.name)).items():
            ok = value is None or isinstance(value, (bool, int, float, str, list, dict))
            flat[name] = value if ok else str(value)
    return flat


class WandbWriter:
    """A Weights & Biases run (``--wandb-project``, ``--wandb-exp-name``, ``--wandb-entity``,
    ``--wandb-save-dir``) holding the trainer's scalars; W&B's own environment variables apply
    (``WANDB_MODE=offline``, ``WANDB_API_KEY``, ...)."""

    def __init__(self, logging_args, save: str | None, config: dict) -> None:
        import wandb

        lg = logging_args
        directory = lg.wandb_save_dir or (os.path.join(save, "wandb") if save else None)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(
            project=lg.wandb_project,
            name=lg.wandb_exp_name,
            entity=lg.wandb_entity,
            dir=directory,
            config=config,
        )
        self._step: int | None = None
        self._row: dict[str, float] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._step is not None and step != self._step:
            self.flush()
        self._step = step
        self._row[tag] = float(value)

    def flush(self) -> None:
        if self._row:
            self.run.log(self._row, step=self._step)
            self._row = {}

    def close(self) -> None:
        self.flush()
        self.run.finish()
