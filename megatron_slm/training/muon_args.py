"""The ``--muon-*`` flags of ``--optimizer muon`` (Megatron-LM's names and defaults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_slm.cli import arg, check_choices, flag_name
from megatron_slm.errors import ConfigError
from megatron_slm.training.newton_schulz import (
    COEFFICIENT_SETS,
    MATMUL_PRECISIONS,
    SCALE_MODES,
    TP_MODES,
    coefficient_schedule,
)


@dataclass
class MuonArgs:
    muon_momentum: float = arg(0.9, "With --optimizer muon: the momentum's EMA coefficient.")
    muon_nesterov: bool = arg(False, "With --optimizer muon: Nesterov momentum.")
    muon_no_split_qkv: bool = arg(
        False,
        "With --optimizer muon: orthogonalise a fused QKV weight as one matrix instead of per "
        "query, key and value block.",
    )
    muon_scale_mode: str = arg(
        "spectral",
        "With --optimizer muon: the update's scale, sqrt(max(rows, cols)) (spectral), "
        "sqrt(rows / cols) (unit_rms_norm) or sqrt(max(1, rows / cols)) (shape_scaling).",
        choices=SCALE_MODES,
    )
    muon_extra_scale_factor: float = arg(
        1.0,
        "With --optimizer muon: a factor on every update (0.2 with spectral: the update's RMS "
        "of AdamW, so AdamW's learning rate and weight decay carry over; Moonlight's recipe).",
    )
    muon_coefficient_type: str = arg(
        "quintic",
        "With --optimizer muon: the Newton-Schulz coefficients (polar_express: at least 8 "
        "steps; quintic and aol: whole cycles of their 5 and 4 sets).",
        choices=tuple(COEFFICIENT_SETS),
    )
    muon_num_ns_steps: int = arg(5, "With --optimizer muon: Newton-Schulz iterations per update.")
    muon_fp32_matmul_prec: str = arg(
        "medium",
        "With --optimizer muon: the iteration's matmuls in bf16 (medium), TF32 on GPU (high) or "
        "fp32 (highest).",
        choices=MATMUL_PRECISIONS,
    )
    muon_tp_mode: str = arg(
        "duplicated",
        "With --optimizer muon and tensor parallelism: orthogonalise each weight whole, "
        "gathered on every rank (duplicated) or with its shards' Gram matrices summed over the "
        "ranks (distributed), both TP 1's update; or each shard on its own (blockwise, no "
        "communication, an update that depends on the TP size).",
        choices=TP_MODES,
    )
    muon_use_syrk: bool = arg(
        False,
        "Refused (Megatron-LM's flag: a Triton kernel for the Gram matrix); the iteration runs "
        "torch's matmuls.",
    )
    muon_scalar_optimizer: str = arg(
        "adam",
        "With --optimizer muon: the optimizer of the other parameters (embeddings, output "
        "layer, norms, biases): AdamW, on the --adam-* flags (Megatron-LM's lion is not "
        "offered).",
        choices=("adam", "lion"),
    )

    def __post_init__(self):
        check_choices(
            self, "muon_scale_mode", "muon_coefficient_type", "muon_fp32_matmul_prec",
            "muon_tp_mode", "muon_scalar_optimizer",
        )  # fmt: skip
        try:
            coefficient_schedule(self.muon_coefficient_type, self.muon_num_ns_steps)
        except ValueError as e:
            raise ConfigError(
                f"--muon-num-ns-steps {self.muon_num_ns_steps} with --muon-coefficient-type "
                f"{self.muon_coefficient_type}: {e}"
            ) from None
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ConfigError(f"--muon-momentum must be in [0, 1), got {self.muon_momentum}")
        if self.muon_use_syrk:
            raise ConfigError(
                "--muon-use-syrk (a Triton kernel of the emerging_optimizers package) is not "
                "offered: leave it out, the Newton-Schulz iteration runs torch's matmuls"
            )
        if self.muon_scalar_optimizer != "adam":
            raise ConfigError(
                f"--muon-scalar-optimizer {self.muon_scalar_optimizer} is not offered: the other "
                "parameters train with AdamW (--muon-scalar-optimizer adam)"
            )

    @property
    def split_qkv(self) -> bool:
        return not self.muon_no_split_qkv

    def given(self) -> list[str]:
        """The flags set away from their defaults (they need --optimizer muon)."""
        return [
            flag_name(f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
