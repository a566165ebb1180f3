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
    from megatron_slm.training.loop import pretrain

    try:
        pretrain(cfg)
    finally:
        launch.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
