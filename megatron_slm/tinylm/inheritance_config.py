"""Settings of ``tools/inherit_parameters.py`` (the CLI is generated from this dataclass)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_slm.cli import arg, check_at_least
from megatron_slm.errors import ConfigError
from megatron_slm.models.args import ModelArgs
from megatron_slm.runtime.plan import LoadArgs
from megatron_slm.tinylm.importance import WIDTH_METHODS
from megatron_slm.tinylm.inheritance_plan import LayerChoice


@dataclass
class InheritConfig(LoadArgs, ModelArgs):
    """The target shape comes from the shared model flags (``--model-preset`` and overrides);
    ``--load`` (the trained source: a checkpoint or a HF directory), ``--device`` and
    ``--tensor-model-parallel-size`` (the source's) are ``LoadArgs``."""

    save: str | None = arg(None, "Where to write the inherited checkpoint.", required=True)
    layers: str | None = arg(
        None,
        "Source layers to keep: ends:A,B (the first A and last B), importance (block importance "
        "on --calibration-data), or a list such as 0,1,2,7. Needed when the target is shallower.",
    )
    width_importance: str = arg(
        "activation",
        "How to rank hidden channels, FFN neurons and heads when the target is narrower: "
        "activation (needs --calibration-data), magnitude (weights only), random (baseline).",
        choices=WIDTH_METHODS,
    )
    calibration_data: str | None = arg(
        None, "Indexed dataset prefix (<P>.bin/.idx) for activation and block importance."
    )
    calibration_samples: int = arg(64, "Calibration rows (sequences).")
    calibration_seq_length: int | None = arg(
        None, "Tokens per calibration row (default: the source's training --seq-length, else 512)."
    )
    calibration_micro_batch_size: int = arg(4, "Calibration rows per forward.")
    pipeline_model_parallel_size: int = arg(1, "PP size the source is loaded with.")
    seed: int = arg(1234, "Seed of the random-init baseline and of --width-importance random.")
    report: str | None = arg(None, "JSON report path (default: <save>/inheritance_report.json).")

    def __post_init__(self):
        LoadArgs.__post_init__(self)
        ModelArgs.__post_init__(self)
        self.layer_choice = LayerChoice.parse(self.layers)
        if self.layer_choice is not None and self.layer_choice.method == "importance":
            if not self.calibration_data:
                raise ConfigError("--layers importance needs --calibration-data")
        check_at_least(
            self,
            "calibration_samples",
            "calibration_micro_batch_size",
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
        )
        if self.calibration_seq_length is not None and self.calibration_seq_length < 2:
            raise ConfigError("--calibration-seq-length must be >= 2")

    def model_args(self) -> ModelArgs:
        """The target-shape flags alone (``ModelArgs`` fields of this config)."""
        from dataclasses import fields

        return ModelArgs(**{f.name: getattr(self, f.name) for f in fields(ModelArgs)})
