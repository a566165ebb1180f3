"""--position-embedding-type yarn (Megatron-LM's flags): the YaRN record with Megatron-LM's
defaults and megatron-core's concentration factor, the inverse frequencies as megatron-core's
YaRN module blends them (its own helpers), the model built with them, the checkpoint record, and
the refusals. Hugging Face's reading and the logits are checked in test_hf_interop.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from megatron.core.models.common.embeddings import yarn_rotary_pos_embedding as mcore_yarn

from megatron_slm.errors import CheckpointError, ConfigError
from megatron_slm.models.args import ModelArgs
from megatron_slm.models.presets import Yarn
from megatron_slm.models.yarn import yarn_inv_freq


def _megatron_core_inv_freq(base, dim, yarn: Yarn) -> torch.Tensor:
    """YarnRotaryEmbedding.get_emb's blend (the module itself runs on CUDA only)."""
    extra = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inter = extra / yarn.factor
    low, high = mcore_yarn._yarn_find_correction_range(
        yarn.beta_fast, yarn.beta_slow, dim, base, yarn.original_max_positions, yarn.truncate
    )
    mask = 1.0 - mcore_yarn._yarn_linear_ramp_mask(low, high, dim // 2, torch.device("cpu"))
    return inter * (1 - mask) + extra * mask


def test_flags_give_megatron_lms_yarn():
    yarn = ModelArgs(position_embedding_type="yarn").yarn()
    assert (yarn.factor, yarn.original_max_positions, yarn.attention_factor) == (1.0, 4096, 1.0)
    assert (yarn.beta_fast, yarn.beta_slow, yarn.truncate) == (32.0, 1.0, True)
    for kw in [dict(rotary_scaling_factor=4.0),
               dict(rotary_scaling_factor=40.0, mscale=0.707, mscale_all_dim=0.707),
               dict(rotary_scaling_factor=8.0, mscale=1.0, mscale_all_dim=0.5,
                    yarn_original_max_position_embeddings=2048, yarn_beta_fast=16.0,
                    yarn_beta_slow=2.0, yarn_correction_range_round_to_int=False)]:  # fmt: skip
        args = ModelArgs(position_embedding_type="yarn", **kw)
        yarn = args.yarn()
        expected = mcore_yarn._yarn_get_concentration_factor(
            kw["rotary_scaling_factor"], kw.get("mscale", 1.0), kw.get("mscale_all_dim", 0.0)
        )
        assert yarn.attention_factor == pytest.approx(expected, rel=1e-12)
        for dim in (64, 128, 48):  # (48: a share of a head)
            torch.testing.assert_close(
                yarn_inv_freq(10000.0, dim, yarn),
                _megatron_core_inv_freq(10000.0, dim, yarn),
                rtol=1e-6,
                atol=0,
            )
        arch = args.architecture(512)
        assert arch.position_embedding_type == "rope" and arch.yarn == yarn
        record = json.loads(json.dumps({"model": dataclasses.asdict(arch)}))
        from megatron_slm.checkpoint import CheckpointInfo, resolve_architecture

        info = CheckpointInfo(path="ckpt", meta=record)
        assert info.model == arch and resolve_architecture(args, info, None) == arch
        json.dumps(args.record())  # (the flags' record is JSON too)
    with pytest.raises(CheckpointError, match="YaRN x8 beyond 2048 positions .* contradicts"):
        resolve_architecture(ModelArgs(position_embedding_type="yarn", rotary_scaling_factor=8.0,
                                       yarn_original_max_position_embeddings=2048), CheckpointInfo(
            path="ckpt", meta={"model": dataclasses.asdict(ModelArgs().architecture(512))}
        ), None)  # fmt: skip


def _yarn_model(rank, world):
    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model

    dev = launch.initialize(device="cpu", seed=1)
    arch = ModelArgs(position_embedding_type="yarn", rotary_scaling_factor=4.0,
                     yarn_original_max_position_embeddings=16).architecture(512)  # fmt: skip
    (model,) = build_model(arch, ModelBuildOptions(transformer_impl="torch"), dev)
    plain = dataclasses.replace(arch, yarn=None)  # (the same weights, plain RoPE)
    (rope,) = build_model(plain, ModelBuildOptions(transformer_impl="torch"), dev)
    rope.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24)[None]
    with torch.no_grad():
        out = [m.eval()(tokens, positions, None) for m in (model, rope)]
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    applied = _yarn_get_concentration_factor_from_config(model.config)
    return arch, model.rotary_pos_emb.inv_freq.clone(), applied, out


def test_model_rotates_with_yarn():
    from tests.dist_helpers import run_distributed

    ((arch, inv_freq, applied, (yarn_logits, rope_logits)),) = run_distributed(_yarn_model, 1)
    torch.testing.assert_close(inv_freq, yarn_inv_freq(10000.0, arch.head_dim, arch.yarn))
    assert applied == pytest.approx(arch.yarn.attention_factor, rel=1e-12)
    assert not torch.allclose(yarn_logits, rope_logits, atol=1e-3)


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            dict(rotary_scaling_factor=2.0),
            "--rotary-scaling-factor needs --position-embedding-type yarn",
        ),
        (dict(mscale_all_dim=1.0), "--mscale-all-dim needs --position-embedding-type yarn"),
        (dict(position_embedding_type="yarn", rotary_scaling_factor=0.5), "factor must be >= 1"),
        (dict(position_embedding_type="yarn", yarn_beta_fast=1.0), "must exceed --yarn-beta-slow"),
        (dict(position_embedding_type="yarn", use_rope_scaling=True), "YaRN replaces LongRoPE"),
    ],
)
def test_yarn_refusals(kw, message):
    with pytest.raises(ConfigError, match=message):
        ModelArgs(**kw).architecture(512)
