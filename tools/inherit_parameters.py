"""Initialise a smaller model from a larger trained one (parameter inheritance).

    python tools/inherit_parameters.py --load ckpt/big --save ckpt/small \\
        --model-preset pangu-pi-1b-pro --layers ends:10,10 \\
        --width-importance activation --calibration-data data/web_text_document \\
        --calibration-samples 256

    python -m megatron_slm.pretrain --load ckpt/small --finetune ...   # continue training

The source is Llama's architecture (RMSNorm, SwiGLU, RoPE, no linear biases), also with Qwen's
QKV biases, QK norm, tied embeddings or a head size that does not split the width (Qwen2/2.5/3,
Llama 3.2); any other is refused. The target shape is a preset and/or --num-layers/--hidden-size/
--ffn-hidden-size/--num-attention-heads/--num-query-groups (the vocabulary, RoPE base, norm
epsilon, head size and those Qwen choices stay the source's). The source loads at any
--tensor-model-parallel-size / --pipeline-model-parallel-size (torchrun with TP x PP processes);
the result is written at TP=1/PP=1 (the trainer reshards), with the kept indices in its
megatron_slm.json and a JSON report (<save>/inheritance_report.json).
"""

import logging
import sys

from megatron_slm import launch
from megatron_slm.entry import entry_point
from megatron_slm.tinylm.inheritance import (
    format_report,
    inherit_weights,
    prepare_inheritance,
    save_inherited,
)
from megatron_slm.tinylm.inheritance_config import InheritConfig

PROG = "inherit_parameters"
GROUPS = {"parameter inheritance": InheritConfig}


@entry_point(PROG, log_level=logging.INFO, doc=__doc__, groups=GROUPS)
def main(cfg: InheritConfig) -> int:
    import torch.distributed as dist

    request = prepare_inheritance(cfg)  # every check, before any process group or weight
    device = launch.initialize_for(cfg)
    inherited = inherit_weights(request, device)
    # The target is built and saved whole: re-initialise at TP=1/PP=1 (the trainer reshards).
    device = launch.initialize(device=cfg.device, seed=cfg.seed)
    report = save_inherited(request, inherited, device)
    if dist.get_rank() == 0:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
