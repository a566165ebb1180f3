"""Hugging Face interop: tiny random Llama / Mistral / Qwen2 / GPT-2 / Nemotron / Qwen3 / Mixtral /
Qwen2-MoE / Qwen3-MoE / GLM-4.5 / Phi-3 models built here -> megatron checkpoints -> our logits,
greedy decoding and perplexity equal transformers' at TP=1 and TP=2; megatron -> HF -> megatron
round trips are bit-identical; exports load in transformers.

Tolerance: fp32 logits within 1e-4 (the issue's bound; the two implementations run the same fp32
operations in the same order on CPU and agree to rounding)."""

import json
import math
import os

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.functional import hf_worker as worker

pytestmark = pytest.mark.slow
ARCHS = ("llama", "mistral", "qwen2", "gpt2", "nemotron", "qwen3", "mixtral", "qwen2_moe",
         "qwen3_moe", "glm4_moe", "phi3")  # fmt: skip
ATOL = 1e-4
PROMPT, NEW_TOKENS, EOS = [5, 17, 42, 7], 12, 2
DOCS = [
    "the quick brown fox jumps over the lazy dog. numbers 0 1 2 3 4 5 6 7 8 9 10 11 12",
    "a tiny model learns to answer tiny questions",
    "red green blue",
]


def _copy_tokenizer(src, dst):
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())


def _hf_perplexity(hf_dir, docs, seq_length, tok_dir):
    """transformers' perplexity of ``docs`` (the tokenizer read from ``tok_dir``: in a model
    directory transformers 5 picks the tokenizer class by the model type, and Qwen2's rebuilds
    this test tokenizer's pre-tokenizer; a real Qwen directory names its own class anyway)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    losses = []
    for text in docs:
        ids = tok(text).input_ids
        for start in range(0, len(ids) - 1, seq_length):
            seg = torch.tensor([ids[start : start + seq_length + 1]])
            with torch.no_grad():
                logits = model(seg[:, :-1]).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits, seg[0, 1:], reduction="none"))
    losses = torch.cat(losses).double()
    return len(losses), math.exp(losses.mean().item())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_interop")
    tok_dir = worker.make_tokenizer(str(root / "tokenizer"))
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    for arch in ARCHS:
        worker.make_hf_model(str(root / arch), arch, vocab, seed=ARCHS.index(arch))
        _copy_tokenizer(tok_dir, str(root / arch))
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    ppl_data = str(root / "docs.jsonl")
    with open(ppl_data, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in DOCS)
    ref = {
        arch: dict(
            logits=worker.hf_logits(str(root / arch), tokens),
            greedy=worker.hf_greedy(str(root / arch), PROMPT, NEW_TOKENS, EOS),
            perplexity=_hf_perplexity(str(root / arch), DOCS, 8, tok_dir),
        )
        for arch in ARCHS
    }
    (tp1,) = run_distributed(
        worker.convert_all_tp1, 1, str(root), ARCHS, tokens, PROMPT, NEW_TOKENS, EOS, ppl_data
    )
    return dict(root=root, tokens=tokens, ref=ref, tp1=tp1, vocab=vocab, tok_dir=tok_dir)


@pytest.mark.parametrize("arch", ARCHS)
def test_tp1_logits_greedy_perplexity(setup, arch):
    ref, ours = setup["ref"][arch], setup["tp1"][arch]
    assert ours["padded"] == 512  # 300 tokens padded for TP=2 x 128
    assert ours["logits"].shape == ref["logits"].shape
    torch.testing.assert_close(ours["logits"], ref["logits"], rtol=0, atol=ATOL)
    assert len(ref["greedy"]) == NEW_TOKENS  # the comparison covers every step
    assert ours["greedy"] == ref["greedy"]
    n_tokens, hf_ppl = ref["perplexity"]
    assert ours["perplexity"]["tokens"] == n_tokens
    assert ours["perplexity"]["perplexity"] == pytest.approx(hf_ppl, rel=1e-5)
    assert ours["perplexity"]["perplexity"] == pytest.approx(
        math.exp(ours["perplexity"]["loss_sum"] / n_tokens), rel=1e-12
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_and_export(setup, arch):
    ours = setup["tp1"][arch]
    assert ours["state"].keys() == ours["state_again"].keys()
    for name, tensor in ours["state"].items():
        assert torch.equal(tensor, ours["state_again"][name]), name
    export = setup["root"] / f"{arch}_export"
    cfg = json.load(open(export / "config.json"))
    src = json.load(open(setup["root"] / arch / "config.json"))
    assert cfg["architectures"] == src["architectures"]
    assert cfg["vocab_size"] == setup["vocab"]
    assert cfg["tie_word_embeddings"] is (arch == "gpt2")  # (GPT-2's default: tied)
    assert os.path.isfile(export / "tokenizer.json")
    # An HF tokenizer without a chat template gains the default one (ProX needs a template).
    from transformers import AutoTokenizer

    from megatron_slm.data.chat import DEFAULT_CHAT_TEMPLATE

    assert AutoTokenizer.from_pretrained(str(export)).chat_template == DEFAULT_CHAT_TEMPLATE
    gen = json.load(open(export / "generation_config.json"))
    assert gen["eos_token_id"] == cfg["eos_token_id"] == EOS
    logits = worker.hf_logits(str(export), setup["tokens"])
    assert torch.equal(logits, setup["ref"][arch]["logits"])
    if arch == "llama":  # Llama 3.1's RoPE scaling, exported as transformers reads it
        assert cfg["rope_scaling"] == worker.LLAMA3_SCALING
    if arch in ("qwen2", "qwen3"):  # YaRN with every parameter, transformers' reading
        given = worker.QWEN2_YARN if arch == "qwen2" else worker.QWEN3_YARN
        assert {
            k: cfg["rope_scaling"][k] for k in given if k not in ("mscale", "mscale_all_dim")
        } == {k: v for k, v in given.items() if k not in ("mscale", "mscale_all_dim")}
        factor = given["factor"]
        expected = (
            (0.1 * math.log(factor) + 1) / (0.05 * math.log(factor) + 1)
            if arch == "qwen2"
            else 0.1 * math.log(factor) + 1
        )
        assert cfg["rope_scaling"]["attention_factor"] == pytest.approx(expected, rel=1e-12)
    if arch == "mistral":  # linear position interpolation; the sliding window back as it came
        assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
        assert cfg["sliding_window"] == src["sliding_window"] == 5


def test_llama3_rope_scaling_frequencies_are_transformers(setup):
    """Short sequences barely turn the scaled (slow) frequencies, so the logits alone would not
    show a missing scaling: our rotary frequencies equal transformers' scaled ones, in each of the
    three bands (kept, smoothed, divided by the factor), and differ from plain RoPE's."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(setup["root"] / "llama"))
    theirs = hf.model.rotary_emb.inv_freq.float()
    ours = setup["tp1"]["llama"]["inv_freq"].float()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    head_dim = theirs.numel() * 2
    plain = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    wavelength = 2 * math.pi / plain
    kept, divided = wavelength < 8192 / 4, wavelength > 8192
    assert kept.any() and divided.any() and (~kept & ~divided).any()  # all three bands
    torch.testing.assert_close(ours[kept], plain[kept], rtol=1e-6, atol=0)
    torch.testing.assert_close(ours[divided], plain[divided] / 8, rtol=1e-6, atol=0)
    assert not torch.allclose(ours[~kept & ~divided], plain[~kept & ~divided], rtol=1e-3)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_yarn_frequencies_are_transformers(setup, arch):
    """YaRN's rotary frequencies equal transformers' (the blend between the original and the
    divided ones), which differ from plain RoPE's: the logits check above also covers the
    attention factor."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(setup["root"] / arch))
    theirs = hf.model.rotary_emb.inv_freq.float()
    ours = setup["tp1"][arch]["inv_freq"].float()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    dim = theirs.numel() * 2
    plain = 1.0 / 1000000.0 ** (torch.arange(0, dim, 2).float() / dim)
    factor = (worker.QWEN2_YARN if arch == "qwen2" else worker.QWEN3_YARN)["factor"]
    kept, divided = torch.isclose(ours, plain), torch.isclose(ours, plain / factor)
    assert kept.any() and divided.any()
    if arch == "qwen2":  # (and blended ones between)
        assert (~kept & ~divided).sum() == 2
    assert hf.model.rotary_emb.attention_scaling > 1.05


def test_tp2_and_pipeline_conversion(setup):
    results = run_distributed(
        worker.tp2_checks,
        2,
        str(setup["root"]),
        ARCHS,
        setup["tokens"],
        PROMPT,
        NEW_TOKENS,
        EOS,
    )[0]
    for arch in ARCHS:
        ref = setup["ref"][arch]
        for source in (f"{arch}_ckpt", arch):  # converted checkpoint, HF directory in memory
            logits, greedy = results[source]
            torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=ATOL, msg=source)
            assert greedy == ref["greedy"], source
    for arch in ("mixtral", "qwen2_moe", "glm4_moe"):  # each rank holds half the experts
        for source in (f"{arch}_ckpt_ep2", f"{arch}_ep2"):
            torch.testing.assert_close(
                results[source], setup["ref"][arch]["logits"], rtol=0, atol=ATOL, msg=source
            )
    tp1_state = setup["tp1"]["llama"]["state"]
    assert results["pp2_state"].keys() == tp1_state.keys()
    for name, tensor in tp1_state.items():
        assert torch.equal(results["pp2_state"][name], tensor), name


def test_cli_export_sharded_and_bad_input(setup):
    """tools/convert_checkpoint.py (run in the conversion worker): sharded export, bad input."""
    rc, _out, err = setup["tp1"]["cli"]
    assert rc == 0, err
    out = setup["root"] / "cli_export"
    index = json.load(open(out / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    logits = worker.hf_logits(str(out), setup["tokens"])
    assert torch.equal(logits, setup["ref"][ARCHS[-1]]["logits"])

    rc, _out, err = setup["tp1"]["cli_bad"]
    assert rc == 2
    assert "unsupported architecture ['GPTNeoXForCausalLM']" in err and "config.json" in err
