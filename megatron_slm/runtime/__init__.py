"""The one way to run a trained model: plan it (``LoadArgs`` -> ``plan_load``: the checkpoint's
metadata or a Hugging Face directory's config read once), load it at any TP/PP
(``load_model(plan, device)``), compute per-token losses, decode greedily or sampled (batched, KV
cache).

Every consumer builds on this package: the offline scorer, the evaluator, the trainer's online
reference, and the tools that follow (ProX generation, parameter inheritance, batch scoring).
Entry points own the process groups (``megatron_slm.launch.initialize`` / ``shutdown``); this
package only uses the parallel state they set up.
"""

from megatron_slm.runtime.forward import (
    forward_logits,
    per_token_losses,
    selective_losses,
    sequence_losses,
    sequence_scores,
)
from megatron_slm.runtime.generate import generate, greedy_generate
from megatron_slm.runtime.loader import LoadedModel, job_device, load_model
from megatron_slm.runtime.plan import DeviceArgs, LoadArgs, LoadPlan, is_hf_dir, plan_load

__all__ = [
    "DeviceArgs",
    "LoadArgs",
    "LoadPlan",
    "LoadedModel",
    "forward_logits",
    "generate",
    "greedy_generate",
    "is_hf_dir",
    "job_device",
    "load_model",
    "per_token_losses",
    "plan_load",
    "selective_losses",
    "sequence_losses",
    "sequence_scores",
]
