"""runtime.plan_load, the one front door of every job that loads a model, on description files
alone (no weights, no process group): it reads a checkpoint's metadata or a Hugging Face
directory's config.json exactly once, resolves the architecture with the checkpoint rules, checks
the recorded tokenizer file's digest, and every loading tool shares its flags."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest

from megatron_slm import checkpoint as ckpt_mod
from megatron_slm.models import get_preset
from megatron_slm.runtime import LoadArgs, hf_source, plan_load

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 50000.0,
}


@pytest.fixture
def reads(monkeypatch):
    """Counts of the two description readers (megatron_slm.json, HF config.json)."""
    counts = {"megatron": 0, "hf": 0}

    def counting(module, name, key):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(ckpt_mod, "read_metadata", "megatron")
    counting(hf_source, "read_hf_config", "hf")
    return counts


def _checkpoint(root, tokenizer: dict | None = None, model: dict | None = None) -> str:
    """A checkpoint root whose iteration directory holds only its metadata (``model``: its
    recorded architecture; default the tiny preset's)."""
    it = root / "ckpt" / "iter_0000003"
    it.mkdir(parents=True)
    meta = {
        "format_version": 1,
        "iteration": 3,
        "model": model or dataclasses.asdict(get_preset("tiny").replace(vocab_size=1000)),
        "padded_vocab_size": 1024,
        "make_vocab_size_divisible_by": 128,
        "params_dtype": "bfloat16",
        "seq_length": 64,
    }
    if tokenizer:
        meta["tokenizer"] = tokenizer
    (it / ckpt_mod.METADATA).write_text(json.dumps(meta))
    (root / "ckpt" / ckpt_mod.TRACKER).write_text("3")
    return str(root / "ckpt")


def test_architecture_choices_recorded_and_checked(tmp_path):
    """A checkpoint records its architecture's choices: metadata from before them means Llama's;
    a GPT-3 checkpoint loads as GPT-3's, flags that name its choices confirm it and a flag that
    names another is refused, in Megatron-LM's words for both."""
    from megatron_slm.errors import UserError
    from megatron_slm.models.presets import GPT3_KIND, KIND_FIELDS
    from megatron_slm.scoring import ScoreConfig

    tiny = dataclasses.asdict(get_preset("tiny").replace(vocab_size=1000))
    older = {k: v for k, v in tiny.items() if k not in KIND_FIELDS}
    plan = plan_load(LoadArgs(load=_checkpoint(tmp_path / "old", model=older)), tokenizer="none")
    assert plan.arch.is_llama and plan.arch == get_preset("tiny").replace(vocab_size=1000)
    gpt3 = _checkpoint(tmp_path / "gpt3", model={**tiny, **GPT3_KIND})

    def flags(**given):
        return ScoreConfig(data_prefix=["d"], load=gpt3, **given)

    confirming = flags(normalization="LayerNorm", position_embedding_type="learned_absolute")
    assert plan_load(confirming, tokenizer="none").arch.kind == GPT3_KIND
    contradiction = r"^--swiglu contradicts the checkpoint .*GeLU \(no activation flag\)"
    with pytest.raises(UserError, match=contradiction):
        plan_load(flags(swiglu=True), tokenizer="none")
    with pytest.raises(UserError, match=r"--untie-embeddings-and-output-weights contradicts"):
        plan_load(flags(untie_embeddings_and_output_weights=True), tokenizer="none")


def test_checkpoint_metadata_read_once(tmp_path, reads):
    plan = plan_load(LoadArgs(load=_checkpoint(tmp_path)), tokenizer="none")
    assert reads == {"megatron": 1, "hf": 0}
    assert plan.arch == get_preset("tiny").replace(vocab_size=1000)
    assert plan.path == str(tmp_path / "ckpt" / "iter_0000003") and not plan.is_hf
    assert plan.padded_vocab_size == 1024 and plan.seq_length == 64
    assert str(plan.params_dtype) == "torch.bfloat16"
    assert plan.divisor_for(2) == 128  # 1024 rows split over TP=2 as recorded


def test_flags_only_confirm_the_checkpoint(tmp_path):
    from megatron_slm.errors import ConfigError, UserError
    from megatron_slm.scoring import ScoreConfig

    load = _checkpoint(tmp_path)
    cfg = ScoreConfig(data_prefix=["d"], load=load, hidden_size=128)
    with pytest.raises(UserError, match="--hidden-size 128 contradicts"):
        plan_load(cfg, tokenizer="none")
    # heads 4 over TP=3: refused before any process group
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size 3 does not divide"):
        plan_load(LoadArgs(load=load, tensor_model_parallel_size=3), tokenizer="none")


def test_hf_directory_read_once_through_the_converter_mapping(tmp_path, reads):
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    plan = plan_load(LoadArgs(load=str(tmp_path), tensor_model_parallel_size=2), tokenizer="none")
    assert reads == {"megatron": 0, "hf": 1}
    assert plan.is_hf and plan.hf_config == HF_CONFIG
    assert plan.arch == hf_source.gpt_config_from_hf(HF_CONFIG)
    assert plan.arch.vocab_size == 300 and plan.arch.rotary_base == 50000.0
    # megatron's padding of the 300 rows at TP=2: a multiple of 128 x 2
    assert plan.padded_vocab_size == 512
    assert plan.checkpoint.tokenizer is None  # no tokenizer files in the directory


def test_swapped_recorded_tokenizer_is_refused_naming_both_digests(tmp_path):
    from megatron_slm.errors import TokenizerError

    model = tmp_path / "tok.model"
    model.write_bytes(b"the tokenizer the model was trained with")
    recorded = hashlib.sha256(model.read_bytes()).hexdigest()[:16]
    record = {"type": "SentencePieceTokenizer", "model": str(model), "vocab_size": 1000}
    load = _checkpoint(tmp_path, dict(record, sha256=recorded))
    plan_load(LoadArgs(load=load), tokenizer="none")  # unchanged: loads
    model.write_bytes(b"another tokenizer under the same name")
    now = hashlib.sha256(model.read_bytes()).hexdigest()[:16]
    for mode in ("none", "optional"):
        with pytest.raises(TokenizerError) as err:
            plan_load(LoadArgs(load=load), tokenizer=mode)
        assert now in str(err.value) and recorded in str(err.value), str(err.value)
        assert "\n" not in str(err.value)


def test_every_loading_tool_shares_the_load_flags():
    """One declaration: the same flags, help and device default (auto) in every tool."""
    from megatron_slm.cli import build_parser
    from megatron_slm.evaluation.config import EvaluateConfig
    from megatron_slm.runtime import DeviceArgs
    from megatron_slm.scoring import ScoreConfig
    from megatron_slm.tinylm.compact_config import RemapConfig
    from megatron_slm.tinylm.inheritance_config import InheritConfig
    from megatron_slm.tinylm.rounds_config import ScoreBatchesConfig
    from megatron_slm.visualize.config import DynamicsConfig, VisualizeConfig
    from megatron_slm.visualize.curve import CurveConfig

    def flags(cls):
        parser = build_parser("t", None, {"g": cls})
        return {a.dest: (a.option_strings, a.default, a.help) for a in parser._actions}

    shared = flags(LoadArgs)
    loaders = (
        ScoreConfig,
        EvaluateConfig,
        InheritConfig,
        VisualizeConfig,
        RemapConfig,
        ScoreBatchesConfig,
    )
    for cls in loaders:
        assert issubclass(cls, LoadArgs), cls
        mine = flags(cls)
        for dest in ("load", "device", "tensor_model_parallel_size"):
            assert mine[dest] == shared[dest], (cls.__name__, dest)
    for cls in (DynamicsConfig, CurveConfig):
        assert issubclass(cls, DeviceArgs) and flags(cls)["device"] == shared["device"]
    assert shared["device"][1] == "auto"
    from megatron_slm.training.config import TrainingArgs  # the trainer: the same flag

    assert flags(TrainingArgs)["device"] == shared["device"]


def test_missing_checkpoint_names_the_flag(tmp_path):
    from megatron_slm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="^--runs a .*: no such checkpoint directory"):
        plan_load(LoadArgs(load=str(tmp_path / "nope")), flag="--runs a")
    assert not os.path.exists(tmp_path / "nope")


def test_ckpt_step_names_one_iteration_of_the_root(tmp_path):
    """--ckpt-step N: that iteration of a checkpoint root instead of the tracker's latest, for
    every loading tool, the trainer and the export; a missing one is named with those there."""
    import shutil

    from megatron_slm.cli import build_parser, parse_configs
    from megatron_slm.errors import CheckpointError, ConfigError
    from megatron_slm.training.config import CheckpointArgs

    root = _checkpoint(tmp_path)  # iteration 3, the latest
    shutil.copytree(os.path.join(root, "iter_0000003"), os.path.join(root, "iter_0000001"))
    first = os.path.join(root, "iter_0000001")
    assert plan_load(LoadArgs(load=root, ckpt_step=1), tokenizer="none").path == first
    assert plan_load(LoadArgs(load=root), tokenizer="none").path.endswith("iter_0000003")
    assert CheckpointArgs(load=root, ckpt_step=1).load == first
    groups = {"load": LoadArgs}
    cfg = parse_configs(
        build_parser("t", None, groups), groups, ["--load", root, "--ckpt-step", "1"]
    )
    assert cfg["load"].load == first
    with pytest.raises(
        CheckpointError, match=r"--ckpt-step 2: --load .* iteration 2 \(it holds 1, 3"
    ):
        LoadArgs(load=root, ckpt_step=2)
    with pytest.raises(CheckpointError, match="one iteration's directory already"):
        LoadArgs(load=first, ckpt_step=1)
    with pytest.raises(ConfigError, match="--ckpt-step needs --load"):
        CheckpointArgs(ckpt_step=1)
    from tools.convert_checkpoint import MegatronToHfConfig  # the export's own --load

    assert MegatronToHfConfig(load=root, save="x", ckpt_step=1).load == first
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(ConfigError, match="a Hugging Face directory"):
        LoadArgs(load=str(hf), ckpt_step=1)
