"""Megatron-LM's own checkpoints -> megatron_slm (``convert_checkpoint.py
megatron-lm-to-megatron``).

The source checkpoint is written here as Megatron-LM's ``save_checkpoint`` writes a GPT model in
``torch_dist``: megatron-core's ``dist_checkpointing.save`` of ``{"model": the model's sharded
state dict, "args": the run's argparse namespace, "iteration", "checkpoint_version"}`` into
``iter_0000007`` beside ``latest_checkpointed_iteration.txt``. Its args are those Megatron-LM
0.16 leaves after ``validate_args`` for the tiny model (the names of its ``arguments.py`` and
of megatron-core's ``TransformerConfig``, with the defaults it keeps for flags not given), and
its tokenizer is Megatron-LM's NullTokenizer (``--vocab-size 511``: 511 ids and its EOD).
Its ``common.pt`` also holds an object of a class the converter does not know, which would run
code if unpickled by pickle itself. The converted checkpoint's logits are the source model's, and
nothing of the pickle ran; what the args or the tokenizer contradict, and a pickle that calls
``os.system``, are refused in one line."""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch

from tests import zygote
from tests.dist_helpers import run_distributed
from tests.functional.pretrain_helpers import REPO

pytestmark = pytest.mark.slow
ITERATION = 7
RAN = "unpickled.txt"  # what _Marker's code would write, were it run


class _Marker:
    """An object of a class the converter does not know: unpickled, it would write a file."""

    def __setstate__(self, state):
        with open(state["path"], "w") as f:
            f.write("ran")


class _RunsCode:
    """Unpickled by pickle itself, it would run a shell command that writes a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"echo ran > {self.path}",))


def _megatron_lm_args(**changes) -> argparse.Namespace:
    from megatron.core.transformer.enums import AttnBackend

    args = dict(
        num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
        group_query_attention=True, num_query_groups=2, kv_channels=16,
        max_position_embeddings=256, seq_length=32, normalization="RMSNorm",
        layernorm_epsilon=1e-5, swiglu=True, squared_relu=False, openai_gelu=False,
        quick_geglu=False, position_embedding_type="rope", rotary_base=10000,
        rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=False,
        rope_scaling_factor=8.0, rotary_seq_len_interpolation_factor=None, mscale=1.0,
        mscale_all_dim=0.0, rotary_scaling_factor=1.0, add_bias_linear=False,
        add_qkv_bias=False, qk_layernorm=False, apply_layernorm_1p=False,
        untie_embeddings_and_output_weights=True, add_position_embedding=True,
        num_experts=None, moe_router_topk=2, moe_router_score_function="softmax",
        moe_layer_freq=1, multi_latent_attention=False, window_size=None, mtp_num_layers=None,
        init_method_std=0.02, tokenizer_type="NullTokenizer", vocab_size=511,
        tokenizer_model=None, vocab_file=None, merge_file=None,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=2, padded_vocab_size=512,
        transformer_impl="transformer_engine", attention_backend=AttnBackend.auto,
        params_dtype=torch.float32, bf16=False, fp16=False,
    )  # fmt: skip
    args.update(changes)
    return argparse.Namespace(**args)


def _save_as_megatron_lm(rank, world, tmp, tokens, variants):
    """A tiny model saved the way Megatron-LM saves one, into ``tmp/NAME`` with the args of
    each variant ``{NAME: (changes, hostile)}``; its logits on ``tokens``. The args then gain an
    object of an unknown class (``hostile``: one whose unpickling calls ``os.system``), put into
    ``common.pt`` afterwards (megatron-core's save deep-copies the state, which would run their
    code here)."""
    from megatron.core import dist_checkpointing

    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model
    from megatron_slm.models.presets import get_preset

    launch.initialize(device="cpu", seed=5)
    (model,) = build_model(get_preset("tiny"), ModelBuildOptions(transformer_impl="torch"))
    mixture = None
    for name, (changes, hostile) in variants.items():
        heads, experts = changes.get("mtp_num_layers"), changes.get("num_experts")
        opts = ModelBuildOptions(transformer_impl="torch", mtp_num_layers=heads)
        saved_model = model
        if heads:
            saved_model = build_model(get_preset("tiny"), opts)[0]
        elif experts:  # written as Megatron-LM writes grouped experts: SequentialMLP's keys
            arch = get_preset("tiny").replace(num_experts=experts, moe_router_topk=2)
            saved_model = mixture = build_model(arch, opts)[0]
        state = {
            "model": saved_model.sharded_state_dict(),
            "args": _megatron_lm_args(**changes),
            "checkpoint_version": 3.0,
            "iteration": ITERATION,
            "num_floating_point_operations_so_far": 0,
        }
        iteration = os.path.join(tmp, name, f"iter_{ITERATION:07d}")
        os.makedirs(iteration)
        dist_checkpointing.save(state, iteration)
        common = os.path.join(iteration, "common.pt")
        saved = torch.load(common, weights_only=False)
        marker = _Marker()
        marker.__dict__["path"] = os.path.join(tmp, RAN)
        saved["args"].some_plugin_object = _RunsCode(marker.path) if hostile else marker
        torch.save(saved, common)
        with open(os.path.join(tmp, name, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(ITERATION))
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1])[None]
        return model.eval()(tokens, positions, None), mixture.eval()(tokens, positions, None)


def _refusals(rank, world, tmp, cases):
    """The one-line error of converting each ``{NAME: tokenizer flags}``."""
    from megatron_slm import launch
    from megatron_slm.convert.megatron_lm import convert_megatron_lm_to_megatron
    from megatron_slm.data.tokenizer import TokenizerArgs
    from megatron_slm.errors import UserError

    launch.initialize(device="cpu")
    lines = {}
    for name, flags in cases.items():
        save = os.path.join(tmp, f"{name}-out")
        try:
            convert_megatron_lm_to_megatron(os.path.join(tmp, name), save, TokenizerArgs(**flags))
        except UserError as e:
            lines[name] = (str(e), os.path.exists(save))
        else:
            lines[name] = ("converted", True)
    return lines


def _converted_logits(rank, world, ckpt, tokens, source):
    from megatron_slm.errors import CheckpointError
    from megatron_slm.runtime import LoadArgs, load_model, plan_load

    try:  # the source itself: every job's loader says how to convert it
        plan_load(LoadArgs(load=source, device="cpu"))
    except CheckpointError as e:
        refusal = str(e)
    loaded = load_model(plan_load(LoadArgs(load=ckpt, device="cpu")), torch.device("cpu"))
    with torch.no_grad():
        return loaded.chunks[0](tokens, torch.arange(tokens.shape[1])[None], None), refusal


def _convert(load, save, *flags):
    cmd = [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"),
           "megatron-lm-to-megatron", "--load", load, "--save", save, *map(str, flags)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return zygote.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_a_megatron_lm_checkpoint_converts_to_the_same_model(tmp_path):
    tokens = torch.randint(0, 511, (2, 24))
    variants = {
        "mlm": ({}, False),
        "gelu": ({"swiglu": False}, False),  # args that describe another model than the weights
        "mla": ({"multi_latent_attention": True}, False),
        "code": ({}, True),  # torch refuses os.system even as a stand-in's name
        "moved": ({"tokenizer_type": "SentencePieceTokenizer",  # (its files left on a cluster)
                   "tokenizer_model": "/cluster/tokenizer.model"}, False),
        "mtp": ({"mtp_num_layers": 1}, False),  # a multi-token prediction head: kept
        # a mixture trained with --moe-grouped-gemm (megatron-core's grouped experts write
        # SequentialMLP's keys), as Megatron-LM 0.16 saves its args (moe_ffn_hidden_size set)
        "moe": ({"num_experts": 4, "moe_grouped_gemm": True, "moe_ffn_hidden_size": 176,
                 "moe_aux_loss_coeff": 1e-2, "moe_token_dispatcher_type": "alltoall",
                 "moe_router_pre_softmax": False, "moe_shared_expert_intermediate_size": None,
                 "moe_router_enable_expert_bias": False, "moe_router_topk_scaling_factor": None},
                False),
    }  # fmt: skip
    (((expected, mixture),),) = [
        run_distributed(_save_as_megatron_lm, 1, str(tmp_path), tokens, variants)
    ]
    source = str(tmp_path / "mlm")
    proc = _convert(source, str(tmp_path / "slm"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = str(tmp_path / "slm" / f"iter_{ITERATION:07d}")
    (((logits, refusal),),) = [run_distributed(_converted_logits, 1, ckpt, tokens, source)]
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    assert "megatron-lm-to-megatron --load" in refusal
    with open(os.path.join(ckpt, "megatron_slm.json")) as f:
        meta = json.load(f)
    assert meta["tokenizer"]["type"] == "NullTokenizer" and meta["tokenizer"]["vocab_size"] == 512
    assert meta["padded_vocab_size"] == 512 and meta["seq_length"] == 32
    assert meta["source"] == f"megatron-lm:{source}/iter_{ITERATION:07d}"

    cases = {"mlm": {"tokenizer_type": "NullTokenizer", "vocab_size": 700}, "gelu": {},
             "mla": {}, "code": {}, "moved": {}, "mtp": {}, "moe": {}}  # fmt: skip
    ((lines,),) = [run_distributed(_refusals, 1, str(tmp_path), cases)]
    assert lines.pop("mtp") == ("converted", True)
    with open(tmp_path / "mtp-out" / f"iter_{ITERATION:07d}" / "megatron_slm.json") as f:
        assert json.load(f)["mtp_num_layers"] == 1
    assert lines.pop("moe") == ("converted", True)
    moe = str(tmp_path / "moe-out" / f"iter_{ITERATION:07d}")
    (((logits, _),),) = [run_distributed(_converted_logits, 1, moe, tokens, str(tmp_path / "moe"))]
    torch.testing.assert_close(logits, mixture, rtol=1e-6, atol=1e-6)
    assert not any(written for _, written in lines.values())
    assert "has 701 ids, padded to 768 rows" in lines["mlm"][0]  # 700 and the EOD
    assert "embedding has 512" in lines["mlm"][0]
    assert "decoder.layers.mlp.linear_fc1.weight is [4, 352, 64]" in lines["gelu"][0]
    assert "has --multi-latent-attention: not built here" in lines["mla"][0]
    common = f"{tmp_path}/code/iter_{ITERATION:07d}/common.pt"
    assert f"cannot read {common}: Weights only load failed" in lines["code"][0]
    assert "cannot load the tokenizer of its args" in lines["moved"][0]
    assert lines["moved"][0].endswith("(give --tokenizer-model: a local copy of its files)")
    assert not (tmp_path / RAN).exists()  # no code of any pickle ran
