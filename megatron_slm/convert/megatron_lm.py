"""Megatron-LM's own checkpoints (``torch_dist``, GPT models) -> megatron_slm checkpoints.

Megatron-LM saves a GPT model with megatron-core's distributed checkpointing, under the keys of
megatron-core's ``sharded_state_dict`` (Transformer Engine's names for the fused norms, which the
local and torch specs map to as well), so the weights load into a megatron_slm model of the same
architecture as they are. What a megatron_slm checkpoint records beside them
(``megatron_slm.json``: the architecture, the tokenizer, the padded vocabulary) is read from the
``args`` namespace Megatron-LM puts in ``common.pt``: its flags have the names of
:class:`~megatron_slm.models.args.ModelArgs`, and ``ModelArgs.architecture`` builds what
Megatron-LM builds from them.

``common.pt`` is a pickle. It is read with torch's ``weights_only`` unpickler: argparse's
namespace, tensors and megatron-core's enums load as themselves (megatron-core allows them), and
every other class it names (``torch.serialization.get_unsafe_globals_in_checkpoint`` lists them
without unpickling) is an inert stand-in that keeps the arguments and state it is given, so no
code of the file runs; torch refuses a file that calls into a module it blocks (``os``,
``subprocess``, ...) however it is allowed. megatron-core's own load of the weights reads
``common.pt`` again, under the same stand-ins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
from dataclasses import dataclass

import torch

from megatron_slm.checkpoint import (
    FORMAT_VERSION,
    CheckpointInfo,
    check_new_output_dir,
    discard_staging_dir,
    iteration_tensor_info,
    load_checkpoint,
    model_sharded_state_dict,
    publish_output_dir,
    save_checkpoint,
    staging_dir,
    tokenizer_record,
    tracked_iteration_dir,
)
from megatron_slm.convert.hf import ConversionError, ImportResult
from megatron_slm.convert.hf_target import dtype_name
from megatron_slm.data.tokenizer import (
    TIKTOKEN_FLAGS,
    check_tokenizer_flags,
    model_path_of,
    tokenizer_of,
)
from megatron_slm.models import GPTModelConfig, ModelBuildOptions, build_model
from megatron_slm.models.args import MOE_ARCHITECTURE_FLAGS, YARN_FLAGS, ModelArgs
from megatron_slm.models.presets import padded_vocab_size

logger = logging.getLogger("megatron_slm")

COMMON = "common.pt"  # megatron-core's file of a checkpoint's non-tensor state
# Megatron-LM flags whose architectures megatron_slm does not build: refused when set.
UNSUPPORTED = (
    "multi_latent_attention",
    "is_hybrid_model",
    "hybrid_override_pattern",
    "heterogeneous_layers_config_path",
    "rotary_interleaved",
    "quick_geglu",
    "window_attn_skip_freq",
    "no_rope_freq",
    "qk_l2_norm",
    "moe_latent_size",
)
# ModelArgs fields whose Megatron-LM destination is another name or the negation of one.
NEGATED = {
    "disable_bias_linear": "add_bias_linear",
    "no_position_embedding": "add_position_embedding",
}
RENAMED = {"norm_epsilon": ("norm_epsilon", "layernorm_epsilon")}
# ModelArgs fields that describe how to run the model, not what it is.
NOT_ARCHITECTURE = {
    "model_preset", "transformer_impl", "attention_backend", "use_mcore_models", "use_flash_attn",
    "attention_dropout", "hidden_dropout", "attention_softmax_in_fp32", "masked_softmax_fusion",
    "bias_gelu_fusion", "persist_layer_norm", "rope_fusion", "gradient_accumulation_fusion",
    "bias_swiglu_fusion", "bias_dropout_fusion", "apply_query_key_layer_scaling",
    "use_cpu_initialization", "padded_vocab_size",
}  # fmt: skip


class _StandIn:
    """An object of a class named in ``common.pt`` that megatron_slm does not read: its
    constructor arguments and pickled state, kept as data."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


@contextlib.contextmanager
def readable_common(iteration: str):
    """Inside, ``torch.load`` (ours and megatron-core's) reads this checkpoint's ``common.pt``
    with each global it names that torch's safe unpickler does not allow replaced by a
    stand-in."""
    path = os.path.join(iteration, COMMON)
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):  # (torch < 2.6)
        raise ConversionError(
            f"reading {path} safely needs torch >= 2.6 (this is {torch.__version__})"
        )
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    stand_ins = [(type(name.rpartition(".")[2], (_StandIn,), {}), name) for name in unsafe]
    with torch.serialization.safe_globals(stand_ins):
        yield


@dataclass(frozen=True)
class MegatronLMCheckpoint:
    path: str  # the iteration directory
    iteration: int
    args: dict  # the saved argparse namespace's attributes


def read_megatron_lm_checkpoint(path: str, flag: str = "--load") -> MegatronLMCheckpoint:
    """The iteration directory of a Megatron-LM checkpoint (its root: the tracker's iteration,
    or ``release``) and its saved flags."""
    if not os.path.isdir(path):
        raise ConversionError(f"{flag} {path}: no such directory")
    iteration = tracked_iteration_dir(path) or path
    common = os.path.join(iteration, COMMON)
    if not os.path.isfile(common):
        raise ConversionError(
            f"{flag} {path}: no {COMMON} in {iteration}: not a Megatron-LM torch_dist checkpoint "
            "(a root with its tracker, or an iter_N directory)"
        )
    try:
        with readable_common(iteration):
            state = torch.load(common, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConversionError(f"{flag} {path}: cannot read {common}: {first}") from None
    args = getattr(state.get("args"), "__dict__", None) if isinstance(state, dict) else None
    if not isinstance(args, dict):
        raise ConversionError(
            f"{flag} {path}: {common} holds no Megatron-LM args (a checkpoint saved by "
            "Megatron-LM's pretrain_gpt.py has them)"
        )
    number = state.get("iteration", 0)
    return MegatronLMCheckpoint(iteration, int(number) if isinstance(number, int) else 0, args)


def model_args(args: dict, flag: str = "--load") -> ModelArgs:
    """:class:`ModelArgs` with a Megatron-LM run's architecture flags (its saved ``args``)."""
    unsupported = [name for name in UNSUPPORTED if args.get(name)]
    if unsupported:
        names = ", ".join(f"--{n.replace('_', '-')}" for n in unsupported)
        raise ConversionError(f"{flag}: the checkpoint's model has {names}: not built here")
    values = {}
    for field in dataclasses.fields(ModelArgs):
        name = field.name
        if name in NOT_ARCHITECTURE:
            continue
        if name in NEGATED:
            if NEGATED[name] in args:
                values[name] = not args[NEGATED[name]]
            continue
        value = next((args[n] for n in RENAMED.get(name, (name,)) if args.get(n) is not None),
                     None)  # fmt: skip
        if value is None:
            continue
        if name == "window_size":  # Megatron-LM's tuple: (left, right)
            value = ",".join(str(v) for v in value)
        elif name == "moe_layer_freq":  # N, or a list of 0/1 per layer
            value = str(list(value)) if isinstance(value, (list, tuple)) else str(value)
        values[name] = value
    # Megatron-LM keeps its defaults of flags that mean nothing without another one; our
    # ModelArgs refuses them given alone
    if not values.get("group_query_attention"):
        values.pop("num_query_groups", None)  # (MHA without the flag)
    if not values.get("num_experts"):
        for name in MOE_ARCHITECTURE_FLAGS:
            values.pop(name, None)
    if values.get("position_embedding_type") != "yarn":
        for name in (*YARN_FLAGS, "yarn_correction_range_round_to_int"):
            values.pop(name, None)
    if not values.get("use_rope_scaling"):
        values.pop("rope_scaling_factor", None)
    try:
        return ModelArgs(**values)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{flag}: the checkpoint's args: {e}") from None


def architecture(args: dict, vocab_size: int, flag: str = "--load") -> GPTModelConfig:
    """What Megatron-LM built from these args, for a tokenizer of ``vocab_size`` ids."""
    missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads") if not args.get(n)]
    if missing:
        raise ConversionError(f"{flag}: the checkpoint's args lack {', '.join(missing)}")
    return model_args(args, flag).architecture(vocab_size)


def convert_megatron_lm_to_megatron(
    load: str, save: str, tokenizer_flags, *, overwrite: bool = False
) -> ImportResult:
    """A Megatron-LM checkpoint -> a megatron_slm checkpoint at ``save`` (weights only, at its
    iteration). ``tokenizer_flags``: :class:`~megatron_slm.data.tokenizer.TokenizerArgs`; each
    flag not given is the checkpoint's own (Megatron-LM's flags have the same names). Call in a
    one-process world (TP 1, PP 1: megatron-core reshards the checkpoint on load)."""
    check_new_output_dir(save, overwrite)
    source = read_megatron_lm_checkpoint(os.path.abspath(load))
    args, where = source.args, f"--load {load}"
    tokenizer, ttype, tmodel = _tokenizer(args, tokenizer_flags, where)
    divisor = args.get("make_vocab_size_divisible_by") or 128
    saved_tp = args.get("tensor_model_parallel_size") or 1
    arch = architecture(args, tokenizer.vocab_size, where)
    padded = padded_vocab_size(tokenizer.vocab_size, divisor, saved_tp)
    tensors = iteration_tensor_info(source.path)
    rows = _embedding_rows(tensors, where)
    if padded != rows:
        raise ConversionError(
            f"{where}: the tokenizer ({' '.join(filter(None, (ttype, tmodel)))}) has "
            f"{tokenizer.vocab_size} ids, "
            f"padded to {padded} rows (--make-vocab-size-divisible-by {divisor} at TP "
            f"{saved_tp}), but the checkpoint's embedding has {rows}: not its tokenizer"
        )
    dtype = _params_dtype(args)
    heads = args.get("mtp_num_layers") or 0
    opts = ModelBuildOptions(
        transformer_impl="torch",
        params_dtype=dtype,
        make_vocab_size_divisible_by=padded,
        mtp_num_layers=heads or None,
    )
    (model,) = build_model(arch, opts)
    _check_weights(model, tensors, where)
    meta = {"format_version": FORMAT_VERSION, "model": dataclasses.asdict(arch)}
    with readable_common(source.path):  # (_check_weights matched the keys: no strictness)
        load_checkpoint(CheckpointInfo(source.path, meta, "--load"), [model], weights_only=True)
    metadata = {
        "source": f"megatron-lm:{source.path}",
        "make_vocab_size_divisible_by": divisor,
        "params_dtype": dtype_name(dtype),
        "tensor_model_parallel_size": saved_tp,
        "tokenizer": tokenizer_record(ttype, tmodel, tokenizer),
        "mtp_num_layers": heads,
        "optimizer_saved": False,
    }
    if args.get("seq_length"):
        metadata["seq_length"] = int(args["seq_length"])
    save = os.path.abspath(save)
    staged = staging_dir(save)
    try:
        staged_ckpt = save_checkpoint(
            staged, source.iteration, [model], model_config=arch, metadata=metadata
        )
        publish_output_dir(staged, save)
    except BaseException:
        discard_staging_dir(staged)
        raise
    ckpt = os.path.join(save, os.path.basename(staged_ckpt))
    logger.info("converted %s -> %s (padded vocabulary %d)", source.path, ckpt, padded)
    return ImportResult(ckpt, arch, padded)


def _tokenizer(args: dict, flags, where: str):
    """(tokenizer, type, model path): the checkpoint's args' tokenizer with the flags given in
    place of its values, or the flags alone where they name another type."""
    names = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size",
             *TIKTOKEN_FLAGS)  # fmt: skip
    given = [n for n in names if getattr(flags, n, None) is not None]
    if flags.tokenizer_type in (None, args.get("tokenizer_type")):
        # the checkpoint's own tokenizer, each flag given in place of its value (e.g. a local
        # copy of its files)
        for name in set(names) - set(given):
            value = args.get(name)
            setattr(flags, name, list(value) if isinstance(value, tuple) else value)
    what = " ".join(f"--{n.replace('_', '-')}" for n in given) or "the tokenizer of its args"
    try:
        check_tokenizer_flags(flags)
        tokenizer = tokenizer_of(flags)
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        hint = "" if given else " (give --tokenizer-model: a local copy of its files)"
        raise ConversionError(f"{where}: cannot load {what}: {first}{hint}") from None
    model = model_path_of(flags.tokenizer_type, flags.tokenizer_model, flags.vocab_file)
    return tokenizer, flags.tokenizer_type, model


def _embedding_rows(tensors: dict, where: str) -> int:
    key = "embedding.word_embeddings.weight"
    if key not in tensors:
        raise ConversionError(f"{where}: the checkpoint holds no {key}: not a GPT model")
    return tensors[key][0][0]


def _params_dtype(args: dict) -> torch.dtype:
    dtype = args.get("params_dtype")
    if isinstance(dtype, torch.dtype):
        return dtype
    if args.get("bf16"):
        return torch.bfloat16
    return torch.float16 if args.get("fp16") else torch.float32


def _check_weights(model, tensors: dict, where: str) -> None:
    """The checkpoint's model weights are those of the built model (same keys): a weight only
    one side has means another architecture than the args describe."""
    sharded = _sharded_tensors(model_sharded_state_dict([model]))
    mine = {sh.key for sh in sharded}
    theirs = {k for k in tensors if not k.startswith(("optimizer.", "rng_state"))}
    extra = sorted(k for k in theirs - mine if "_extra_state" not in k)
    lacking = sorted(k for k in mine - theirs if "_extra_state" not in k)
    for keys, what in ((extra, "weights this architecture has not"), (lacking, "no weights for")):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise ConversionError(f"{where}: the checkpoint holds {what}: {', '.join(keys[:3])}"
                                  f"{more}")  # fmt: skip
    for sh in (sh for sh in sharded if "_extra_state" not in sh.key):
        # (a tensor factory, e.g. SwiGLU's halves, holds one layer's whole weight: the stacked
        # layers' axis comes first in the checkpoint)
        shape = tuple(getattr(sh, "global_shape", None) or sh.data.shape)
        saved = tuple(tensors[sh.key][0])
        if saved[len(saved) - len(shape) :] != shape:
            raise ConversionError(
                f"{where}: the checkpoint's {sh.key} is {list(tensors[sh.key][0])}, the model its "
                f"args describe has {list(shape)}: another architecture"
            )


def _sharded_tensors(state: dict):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    return [v for v in nested_values(state) if isinstance(v, ShardedBase)]
