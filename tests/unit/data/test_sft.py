"""SFT data: chat-format JSONL checks, the assistant-token mask, truncation, packing; and on the
real megatron-core model: packed rows give the unpacked per-token losses (no cross-example
attention), and prompt labels have no effect on the gradient (plain and selective-op loss)."""

import functools
import json
import types

import numpy as np
import pytest
import torch

from megatron_slm.data import build_tokenizer, train_sentencepiece
from megatron_slm.data.chat import tokenize_chat
from megatron_slm.data.sft import (
    SFTDataError,
    SFTDataset,
    read_sft_examples,
)
from megatron_slm.models.document_mask import DocumentMask
from megatron_slm.models.presets import GPT3_KIND
from tests.dist_helpers import run_distributed

WORDS = "the quick brown fox jumps over a lazy dog keep drop line text spam".split()
SEQ = 160


def _example(rng, n_user, n_answer):
    pick = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
    return {
        "messages": [
            {"role": "system", "content": "You refine."},
            {"role": "user", "content": pick(n_user)},
            {"role": "assistant", "content": pick(n_answer)},
        ]
    }


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    model = train_sentencepiece(
        [" ".join(WORDS) + "\n<|user|> <|assistant|>"] * 20, str(root / "sp"), 300
    )
    rng = np.random.default_rng(0)
    path = root / "seeds.jsonl"
    examples = [_example(rng, int(rng.integers(1, 6)), int(rng.integers(1, 4))) for _ in range(9)]
    examples.append(_example(rng, 3, 40))  # longer than SEQ + 1 tokens: truncated
    path.write_text("".join(json.dumps(e) + "\n" for e in examples) + "\n")
    return build_tokenizer("SentencePieceTokenizer", model), str(path), examples


def test_bad_jsonl_names_file_and_line(tmp_path):
    cases = {
        '{"messages": [}': "invalid JSON",
        '{"text": "x"}': "'messages' list",
        '{"messages": [{"role": "user"}]}': "string 'role' and 'content'",
        '{"messages": [{"role": "bot", "content": "x"}]}': "role 'bot'",
        '{"messages": [{"role": "user", "content": "x"}]}': "no assistant message",
    }
    for line, reason in cases.items():
        path = tmp_path / "bad.jsonl"
        good = json.dumps({"messages": [{"role": "assistant", "content": "ok"}]})
        path.write_text(good + "\n\n" + line + "\n")
        with pytest.raises(SFTDataError, match=f"--sft-data {path}:3: .*{reason}"):
            read_sft_examples([str(path)])
    with pytest.raises(SFTDataError, match="cannot read"):
        read_sft_examples([str(tmp_path / "missing.jsonl")])


def test_mask_covers_exactly_the_assistant_turns(sft):
    tok, _, examples = sft
    messages = examples[0]["messages"] + [
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "second answer"},
    ]
    ids, mask = tokenize_chat(tok, messages)
    assert len(ids) == len(mask)
    # The first prompt is tokenized exactly as inference tokenizes the generation prompt.
    prompt = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs.append(cur)
    # Each assistant run is its content (sentencepiece's dummy-prefix space dropped) + eos.
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [r[-1] for r in runs] == [tok.eod, tok.eod]
    assert [tok.detokenize(r[:-1]).strip() for r in runs] == answers


def test_packing_truncation_epochs_and_determinism(sft):
    tok, path, examples = sft
    ds = SFTDataset(tok, [path], SEQ, seed=3, num_samples=12)
    assert ds.stats.truncated == 1 and ds.stats.dropped == 0 and ds.stats.examples == 10
    per_epoch = ds.stats.rows_per_epoch[0]
    assert per_epoch < 10  # rows hold several examples
    assert len(ds) >= 12 and len(ds.stats.rows_per_epoch) == -(-12 // per_epoch)
    dropped = SFTDataset(tok, [path], SEQ, seed=3, num_samples=1, too_long="drop")
    assert dropped.stats.dropped == 1 and dropped.stats.examples == 9
    again = SFTDataset(tok, [path], SEQ, seed=3, num_samples=12)
    other = SFTDataset(tok, [path], SEQ, seed=4, num_samples=12)
    assert ds.rows == again.rows and ds.rows != other.rows
    assert ds.rows[:per_epoch] != ds.rows[per_epoch : 2 * per_epoch]  # reshuffled per epoch
    # Every epoch holds every example once; a row is its examples back to back.
    full = [tokenize_chat(tok, e["messages"]) for e in examples]
    for e in range(len(ds.stats.rows_per_epoch)):
        lo = sum(ds.stats.rows_per_epoch[:e])
        rows = ds.rows[lo : lo + ds.stats.rows_per_epoch[e]]
        assert sorted(i for r in rows for i in r) == list(range(10))
    for idx in range(len(ds)):
        sample = ds[idx]
        pos = 0
        for k, i in enumerate(ds.rows[idx]):
            ids, mask = full[i]
            n = min(len(ids) - 1, SEQ)
            assert sample["tokens"][pos : pos + n].tolist() == ids[:n]
            assert sample["labels"][pos : pos + n].tolist() == ids[1 : n + 1]
            assert sample["loss_mask"][pos : pos + n].tolist() == mask[1 : n + 1]
            assert sample["position_ids"][pos : pos + n].tolist() == list(range(n))
            assert (sample["segment_ids"][pos : pos + n] == k).all()
            pos += n
        assert not sample["loss_mask"][pos:].any()
        assert (sample["segment_ids"][pos:] == len(ds.rows[idx])).all()


def _model_checks(rank, world, tokenizer, path, kind):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_slm.models import ModelBuildOptions, build_model, get_preset
    from megatron_slm.platform import enable_cpu_backend
    from megatron_slm.training.loop import Trainer
    from megatron_slm.training.slm_loss import MicroBatchSelection, SelectiveLMLoss

    enable_cpu_backend()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(7)
    arch = get_preset("tiny").replace(**kind)
    (model,) = build_model(arch, ModelBuildOptions(transformer_impl="torch"))
    ds = SFTDataset(tokenizer, [path], SEQ, seed=0, num_samples=2)
    rows = [ds[i] for i in range(2)]
    assert max(len(r) for r in ds.rows[:2]) > 1
    batch = {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}
    mask = DocumentMask(batch["segment_ids"]).dense()
    out = {}
    with torch.no_grad():
        packed = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
        unpacked = torch.zeros_like(packed)
        for b, row in enumerate(ds.rows[:2]):
            pos = 0
            for i in row:
                ids = torch.as_tensor(ds.examples[i][0])[None]
                n = ids.shape[1] - 1
                alone = model(ids[:, :-1], torch.arange(n)[None], None, labels=ids[:, 1:])
                unpacked[b, pos : pos + n] = alone[0]
                pos += n
            unpacked[b, pos:] = packed[b, pos:]  # padding
        out["packed"], out["unpacked"] = packed, unpacked

    # Prompt labels replaced by random ids: the same gradient, bit for bit.
    g = torch.Generator().manual_seed(1)
    loss_mask = batch["loss_mask"]
    noise = torch.randint(0, 300, batch["labels"].shape, generator=g)
    changed = torch.where(loss_mask.bool(), batch["labels"], noise)
    assert (changed != batch["labels"]).any()

    def grads(labels, selective):
        model.zero_grad()
        if selective:  # the trainer's --slm-ratio path: the op's loss mask
            slm = SelectiveLMLoss("microbatch", "loss", "keep")
            slm.install(model)
            slm.prepare(MicroBatchSelection(None, loss_mask, 1.0, 0))
            per_token = model(batch["tokens"], batch["position_ids"], mask, labels=labels)
            loss = (per_token * slm.last.selected.t()).sum()
            del model.compute_language_model_loss
        else:  # the trainer's plain path (megatron-core's loss, masked by its _loss_func)
            per_token = model(batch["tokens"], batch["position_ids"], mask, labels=labels)
            # the trainer's state _loss_func reads (no blend, no MTP heads, no teacher)
            unblended = types.SimpleNamespace(n_sources=0, distill=None, mtp=None)
            for step in ("_with_sources", "_with_heads", "_distilled"):
                setattr(unblended, step, functools.partial(getattr(Trainer, step), unblended))
            loss = Trainer._loss_func(unblended, None, loss_mask, None, None, per_token)[0]
        loss.backward()
        return [p.grad.clone() for p in model.parameters()], loss.detach()

    for selective in (False, True):
        (ga, la), (gb, lb) = grads(batch["labels"], selective), grads(changed, selective)
        out[f"same_{selective}"] = la.item() == lb.item() and all(
            torch.equal(a, b) for a, b in zip(ga, gb)
        )
        out[f"nonzero_{selective}"] = sum(a.abs().sum().item() for a in ga) > 0
    return out


@pytest.mark.parametrize("kind", [{}, GPT3_KIND], ids=["llama", "gpt3"])
def test_packed_losses_and_prompt_label_invariance(sft, kind):
    """Each packed example's losses are its losses alone: with RoPE (relative) and with GPT-3's
    learned positions, which the rows' restarting position ids index."""
    tok, path, _ = sft
    ((out),) = run_distributed(_model_checks, 1, tok, path, kind)
    torch.testing.assert_close(out["packed"], out["unpacked"], rtol=0, atol=1e-5)
    for selective in (False, True):
        assert out[f"same_{selective}"] and out[f"nonzero_{selective}"]


def test_trainer_cli_errors_before_any_work(sft, tmp_path, capsys):
    from megatron_slm.pretrain import main

    tok, path, _ = sft
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(path).readline() + '{"messages": "oops"}\n')
    base = ["--model-preset", "tiny", "--train-iters", "2", "--seq-length", str(SEQ)]
    sp = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok._model_file]
    cases = [
        ([*sp, "--sft-data", str(bad)], f"--sft-data {bad}:2: expected an object"),
        (["--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--sft-data", path],
         "needs a tokenizer with a chat template"),
        ([*sp, "--sft-data", path, "--data-path", "x"], "either --data-path or --sft-data"),
        ([*sp, "--sft-data", path, "--transformer-impl", "local"], "--transformer-impl torch"),
        ([*sp, "--sft-data", path, "--sft-epochs", "1", "--global-batch-size", "64"],
         "--sft-epochs 1 gives"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main([*base, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("python -m megatron_slm.pretrain: error: ") and message in err[-1]
