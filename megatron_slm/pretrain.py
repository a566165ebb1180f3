"""``python -m megatron_slm.pretrain``: SLM pretraining on megatron-core (torchrun or srun)."""

from __future__ import annotations

import logging
import os
import sys

from megatron_slm import launch
from megatron_slm._extension import report_once
from megatron_slm.entry import entry_point
from megatron_slm.errors import ConfigError
from megatron_slm.training.config import parse_config

PROG = "python -m megatron_slm.pretrain"
LOGGING_LEVEL_ENV = "MEGATRON_LOGGING_LEVEL"


@entry_point(PROG, log_level=logging.INFO)
def main(argv: list[str] | None = None) -> int:
    # megatron-core logs every bucket's parameter names and its whole optimizer config at INFO.
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    cfg = parse_config(argv)
    set_logging_level(cfg.logging.logging_level)
    report_once()
    from megatron_slm.training.loop import plan_training, pretrain

    # Every check (flags, data files, checkpoint) before any process group or model.
    plan = plan_training(cfg, launch.process_info().world_size)
    p = cfg.parallel
    if cfg.training.deterministic_mode:
        launch.enable_deterministic_mode()
    device = launch.initialize(
        device=cfg.training.device,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=plan.virtual_pipeline_size(cfg),
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        seed=cfg.training.seed,
        timeout_minutes=p.distributed_timeout_minutes,
        order=launch.TP_PP_DP_ORDER if p.use_tp_pp_dp_mapping else launch.DEFAULT_RANK_ORDER,
        gloo_groups=not p.disable_gloo_process_groups,
        optimizer_instances=p.num_distributed_optimizer_instances,
    )
    pretrain(cfg, plan, device)
    return 0


def set_logging_level(level: int | None) -> None:
    """--logging-level, else Megatron-LM's MEGATRON_LOGGING_LEVEL: every logger's level."""
    if level is None:
        value = os.environ.get(LOGGING_LEVEL_ENV, "").strip()
        if not value:
            return
        try:
            level = int(value)
        except ValueError:
            raise ConfigError(
                f"{LOGGING_LEVEL_ENV}={value!r}: not a logging level (10, 20, ...)"
            ) from None
    for name in ("", "megatron.core"):  # (the root: megatron_slm's and the others')
        logging.getLogger(name).setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
