"""The files of an exported Hugging Face directory besides its config: safetensors shards (and
their index) and the tokenizer (checked against the checkpoint's record, with a chat template)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator

import torch

from megatron_slm.checkpoint import CheckpointInfo
from megatron_slm.convert.tokenizer_export import (
    set_chat_template,
    write_gpt2_hf_tokenizer,
    write_sentencepiece_hf_tokenizer,
    write_tiktoken_hf_tokenizer,
)
from megatron_slm.models.presets import GPTModelConfig
from megatron_slm.remote_code import load_auto_tokenizer
from megatron_slm.runtime.hf_source import ConversionError, tokenizer_files

logger = logging.getLogger("megatron_slm")


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """Copy the tokenizer of directory ``src`` (its code too, when it is code) into ``dst``."""
    files = tokenizer_files(src)
    for f in files:
        target = os.path.join(dst, f)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(src, f), target)
    return files


def tokenizer_vocab_size(path: str, trust_remote_code: bool = False) -> int:
    return len(load_auto_tokenizer(path, trust_remote_code, f"--load {path}"))


def check_tokenizer_vocab(tok_path: str, n_tokens: int, model: GPTModelConfig, padded: int):
    if n_tokens > padded:
        raise ConversionError(
            f"tokenizer {tok_path}: vocabulary of {n_tokens} tokens is larger than the padded "
            f"vocabulary size {padded} of model.embed_tokens.weight"
        )
    if n_tokens > model.vocab_size:
        logger.warning(
            "tokenizer %s has %d tokens, more than vocab_size %d: ids >= %d use zero padding rows",
            tok_path,
            n_tokens,
            model.vocab_size,
            model.vocab_size,
        )


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", size.upper())
    if not m:
        raise ConversionError(f"--max-shard-size {size!r}: expected e.g. 5GB, 500MB or bytes")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def write_hf_weights(
    tensors: Iterator[tuple[str, torch.Tensor]], save: str, max_shard_size: str | int = "5GB"
) -> list[str]:
    """safetensors file(s) (+ ``model.safetensors.index.json`` when sharded); returns file names."""
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().clone()
        size += nbytes
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map, total = {}, 0
    for file, shard in zip(names, shards):
        save_file(shard, os.path.join(save, file), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = file
            total += t.numel() * t.element_size()
    if n > 1:
        with open(os.path.join(save, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def _checkpoint_file(ckpt: str, recorded: str | None, name: str) -> str | None:
    """A recorded tokenizer path, or the copy beside a moved checkpoint (root/``name``)."""
    if recorded and os.path.exists(recorded):
        return recorded
    root = os.path.dirname(ckpt) if os.path.basename(ckpt).startswith("iter_") else ckpt
    beside = os.path.join(root, name)
    return beside if os.path.exists(beside) else None


def export_tokenizer(
    info: CheckpointInfo,
    save: str,
    tokenizer_model: str | None = None,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
) -> dict | None:
    """Write the checkpoint's tokenizer to ``save`` as a Hugging Face tokenizer with a chat
    template; return its ``{bos,eos,pad}_token_id`` (None when no tokenizer was written).

    * ``tokenizer_model`` (``--tokenizer-model``): a HF tokenizer directory or SentencePiece file
      to use instead of the recorded one;
    * a SentencePiece tokenizer becomes ``tokenizer.json`` + ``tokenizer_config.json`` +
      ``special_tokens_map.json`` (``convert.tokenizer_export``), ids equal to ours (a
      Llama2Tokenizer's with the BOS it leads each text with);
    * a HF tokenizer is copied as is (with the Python code it ships, which runs to read its
      special ids only with ``trust_remote_code``);
    * a GPT2BPETokenizer's recorded vocab and merges files (or ``vocab.json``/``merges.txt``
      beside a moved checkpoint) become GPT-2's Hugging Face tokenizer;
    * a TikTokenizer's recorded JSON vocabulary (or ``tiktoken.json`` beside a moved checkpoint,
      or ``--tokenizer-model FILE``) with its recorded options becomes a byte-level BPE giving
      its ids (``convert.tokenizer_export.write_tiktoken_hf_tokenizer``);
    * the chat template: ``chat_template`` (``--chat-template FILE``), else the one the checkpoint
      records (``chat_template``: an SFT run's), else the HF tokenizer's own, else
      ``data.chat.DEFAULT_CHAT_TEMPLATE``, the template the trainer's SFT mode uses by default.

    The file written must hash to the digest the checkpoint records for its tokenizer (when it
    records one and the file is of the recorded kind): an export never ships a tokenizer the model
    was not trained with.
    """
    from megatron_slm.checkpoint import check_recorded_tokenizer
    from megatron_slm.data.chat import DEFAULT_CHAT_TEMPLATE
    from megatron_slm.data.tokenizer import SENTENCEPIECE_TYPES, build_tokenizer

    ckpt, meta = info.path, info.meta
    record = meta.get("tokenizer") or {}
    chosen = chat_template or meta.get("chat_template")
    src = tokenizer_model
    if src is None and record.get("type") == "HuggingFaceTokenizer":
        src = _checkpoint_file(ckpt, record.get("model"), "tokenizer")
    elif src is None and record.get("type") in SENTENCEPIECE_TYPES:
        src = _checkpoint_file(ckpt, record.get("model"), "tokenizer.model")
        if src is None:
            raise ConversionError(
                f"--load {ckpt}: the recorded SentencePiece model {record.get('model')} is missing;"
                " give it with --tokenizer-model"
            )
    elif record.get("type") == "TikTokenizer" and (src is None or os.path.isfile(src)):
        src = src or _checkpoint_file(ckpt, record.get("model"), "tiktoken.json")
        if src is None:
            raise ConversionError(
                f"--load {ckpt}: the recorded TikTokenizer vocabulary {record.get('model')} is "
                "missing; give it with --tokenizer-model"
            )
        check_recorded_tokenizer(info, src)
        tok = build_tokenizer(
            "TikTokenizer", src, record.get("vocab_size"), tiktoken=record.get("tiktoken")
        )
        write_tiktoken_hf_tokenizer(tok, save, chosen or DEFAULT_CHAT_TEMPLATE)
        return _special_ids(save)
    elif record.get("type") == "GPT2BPETokenizer":
        if src is not None and not os.path.isdir(src):
            raise ConversionError(
                f"--tokenizer-model {src}: a GPT2BPETokenizer checkpoint exports its recorded "
                "vocab and merges files; give a Hugging Face tokenizer directory, or none"
            )
        if src is None:
            files = [
                _checkpoint_file(ckpt, record.get(key), name)
                for key, name in (("model", "vocab.json"), ("merge_file", "merges.txt"))
            ]
            if None in files:
                raise ConversionError(
                    f"--load {ckpt}: the recorded GPT-2 BPE files {record.get('model')} and "
                    f"{record.get('merge_file')} are not both there; restore them, or put them "
                    "beside the checkpoint as vocab.json and merges.txt"
                )
            check_recorded_tokenizer(info, *files)
            write_gpt2_hf_tokenizer(*files, save, chosen or DEFAULT_CHAT_TEMPLATE)
            return _special_ids(save)
    if src is None:
        logger.warning("no tokenizer recorded for %s: none written to %s", ckpt, save)
        return None
    check_recorded_tokenizer(info, src)
    if os.path.isfile(src):
        add_bos = record.get("type") == "Llama2Tokenizer"  # its ids lead with BOS
        write_sentencepiece_hf_tokenizer(
            src, save, chosen or DEFAULT_CHAT_TEMPLATE, add_bos=add_bos
        )
    elif os.path.isdir(src):
        if not copy_tokenizer(src, save):
            raise ConversionError(f"--tokenizer-model {src}: holds no tokenizer files")
        if set_chat_template(save, chosen or DEFAULT_CHAT_TEMPLATE, overwrite=bool(chosen)):
            logger.info("chat template written to %s/tokenizer_config.json", save)
        subject = f"--tokenizer-model {src}" if tokenizer_model else src
        return _special_ids(save, trust_remote_code, subject)
    else:
        raise ConversionError(f"--tokenizer-model {src}: no such file or directory")
    return _special_ids(save)


def _special_ids(save: str, trust_remote_code: bool = False, subject: str | None = None) -> dict:
    """``{bos,eos,pad}_token_id`` of the tokenizer written to ``save`` (a copy of ``subject``'s:
    what an error names)."""
    tok = load_auto_tokenizer(save, trust_remote_code, subject or save)
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
