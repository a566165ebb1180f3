"""``python -m megatron_slm.pretrain``: SLM pretraining on megatron-core (torchrun or srun)."""

from __future__ import annotations

import logging
import sys

from megatron_slm import launch
from megatron_slm._extension import report_once
from megatron_slm.training.config import parse_config


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # megatron-core logs every bucket's parameter names and its whole optimizer config at INFO.
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    cfg = parse_config(argv)
    report_once()
    from megatron_slm.training.loop import plan_training, pretrain

    try:
        plan = plan_training(cfg, launch.process_info().world_size)
    except ValueError as e:  # bad flags or inputs: one line, like argparse's own errors
        print(f"python -m megatron_slm.pretrain: error: {e}", file=sys.stderr)
        return 2
    p = cfg.parallel
    try:
        device = launch.initialize(
            device=cfg.training.device,
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=plan.virtual_pipeline_size(cfg),
            seed=cfg.training.seed,
        )
        pretrain(cfg, plan, device)
    finally:
        launch.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
