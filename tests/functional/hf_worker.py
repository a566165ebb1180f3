"""Helpers for the Hugging Face interop and evaluation tests: a tiny byte-level BPE tokenizer and
tiny random Llama / Mistral models built locally, plus worker functions run in spawned gloo
processes (see tests/dist_helpers.py)."""

from __future__ import annotations

import json
import os
import re

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "Question: what color is the sky?\nAnswer: blue",
    "Question: how many legs has a cat?\nAnswer: 4",
    "a tiny model learns to answer tiny questions with tiny answers.",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 and words: red green blue yellow.",
]


def make_tokenizer(path: str, vocab_size: int = 300) -> str:
    """Train a byte-level BPE tokenizer on CORPUS; save it as a HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)
    return path


# YaRN: Qwen's documented setting (factor and trained length only; a length of 8, which the
# rows pass), and one with every parameter given (the attention factor from DeepSeek's mscale
# ratio, bounds not rounded: frequencies 2 and 3 blend the original and the divided ones).
QWEN3_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
QWEN2_YARN = {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 2048,
              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.5,
              "truncate": False}  # fmt: skip
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip


# LongRoPE over an original length of 8 (Phi-3.5's form): the tests' 16-token rows use the long
# factors, the 8-token perplexity windows the short ones, and greedy generations from a 4-token
# prompt switch from short to long at their 9th token; attention factor sqrt(1 + ln 16 / ln 8).
PHI3_LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.25, 1.5, 2.0],
                 "long_factor": [1.0, 3.0, 9.0, 27.0]}  # fmt: skip


def make_hf_model(path: str, arch: str, vocab_size: int, seed: int = 0, **overrides):
    """A tiny random LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM /
    Qwen3ForCausalLM / NemotronForCausalLM / Phi3ForCausalLM / MixtralForCausalLM (4 experts,
    top-2, a window of 7) / Qwen2MoeForCausalLM (a mixture with a gated shared expert in layer 0,
    layer 1 dense, the softmax over all experts; Qwen2 and Qwen3 with YaRN, :data:`QWEN2_YARN`
    and :data:`QWEN3_YARN`) / Qwen3MoeForCausalLM (layer 0 dense, a mixture
    in layer 1: decoder_sparse_step 2, renormalised top-k) / Glm4MoeForCausalLM (layer 0 dense;
    8 experts in 4 groups, top-2 from 1 group, sigmoid scores with a random expert bias, scaled
    x2.5, a shared expert of two experts' width; QKV biases, QK norm, RoPE on half of each head; a
    multi-token-prediction layer's tensor beyond its layers) / GPT2LMHeadModel saved
    (safetensors) at ``path``; Phi-3 with its fused projections, RoPE on half of each head, a
    sliding window of 6 and LongRoPE (:data:`PHI3_LONGROPE`); the
    Llama one with Llama 3.1's RoPE scaling, whose frequencies at head size 16 and base 5e5 fall
    in all three of its bands (kept, smoothed, divided by the factor), the Mistral one with linear
    RoPE scaling (positions / 4) and a sliding window of 5 tokens (the tests' rows and
    generations reach beyond it); Nemotron as Minitron's (LayerNorm 1p, squared ReLU, RoPE on
    half of each head); GPT-2 as released: tanh GeLU (gelu_new), tied embeddings, biases, learned
    positions."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "nemotron":  # LayerNorm 1p, squared ReLU, RoPE on half of each head
        cfg_cls, model_cls = transformers.NemotronConfig, transformers.NemotronForCausalLM
        kwargs = {k: v for k, v in kwargs.items() if k != "rms_norm_eps"}
        kwargs.update(head_dim=16, norm_eps=1e-5, partial_rotary_factor=0.5, rope_theta=10000.0)
    elif arch == "gpt2":
        cfg_cls, model_cls = transformers.GPT2Config, transformers.GPT2LMHeadModel
        kwargs = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=vocab_size,
                      bos_token_id=1, eos_token_id=2, activation_function="gelu_new")  # fmt: skip
    elif arch == "llama":
        cfg_cls, model_cls = LlamaConfig, LlamaForCausalLM
        kwargs.update(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING))
    elif arch == "phi3":  # fused projections, RoPE on half of each head, a window of 6
        cfg_cls, model_cls = transformers.Phi3Config, transformers.Phi3ForCausalLM
        kwargs.update(rope_theta=10000.0, partial_rotary_factor=0.5, sliding_window=6,
                      pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                      original_max_position_embeddings=8,
                      rope_scaling=dict(PHI3_LONGROPE))  # fmt: skip
    elif arch == "mixtral":  # 4 SwiGLU experts of 96, top-2, a window of 7
        cfg_cls, model_cls = transformers.MixtralConfig, transformers.MixtralForCausalLM
        kwargs.update(rope_theta=10000.0, num_local_experts=4, num_experts_per_tok=2,
                      intermediate_size=96, sliding_window=7,
                      router_jitter_noise=0.0)  # fmt: skip
    elif arch in ("qwen2_moe", "qwen3_moe"):  # 4 experts of 48, top-2
        name = "Qwen2Moe" if arch == "qwen2_moe" else "Qwen3Moe"
        cfg_cls = getattr(transformers, f"{name}Config")
        model_cls = getattr(transformers, f"{name}ForCausalLM")
        kwargs.update(rope_theta=1000000.0, use_sliding_window=False, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48)  # fmt: skip
        if arch == "qwen2_moe":
            kwargs.update(shared_expert_intermediate_size=80, mlp_only_layers=[1],
                          norm_topk_prob=False)  # fmt: skip
        else:
            kwargs.update(head_dim=32, decoder_sparse_step=2, norm_topk_prob=True)
    elif arch == "glm4_moe":  # GLM-4.5's: see the docstring
        cfg_cls, model_cls = transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM
        kwargs.update(head_dim=16, rope_theta=10000.0, partial_rotary_factor=0.5,
                      attention_bias=True, use_qk_norm=True, n_routed_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=2,
                      n_group=4, topk_group=1, first_k_dense_replace=1,
                      routed_scaling_factor=2.5, norm_topk_prob=True,
                      num_nextn_predict_layers=1)  # fmt: skip
    elif arch == "mistral":
        cfg_cls, model_cls = MistralConfig, MistralForCausalLM
        kwargs.update(rope_theta=10000.0, sliding_window=5, num_attention_heads=8,
                      rope_scaling={"rope_type": "linear", "factor": 4.0})  # fmt: skip
    else:  # qwen2 (QKV biases), qwen3 (QK norm)
        name = "Qwen2" if arch == "qwen2" else "Qwen3"
        cfg_cls = getattr(transformers, f"{name}Config")
        model_cls = getattr(transformers, f"{name}ForCausalLM")
        kwargs.update(rope_theta=1000000.0, use_sliding_window=False,
                      rope_scaling=dict(QWEN2_YARN if arch == "qwen2" else QWEN3_YARN))  # fmt: skip
        if arch == "qwen3":  # heads of 32 on a width of 64, as Qwen3-0.6B's do not split it
            kwargs.update(head_dim=32, attention_bias=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs)).float().eval()
    # Non-trivial norm weights and biases, so a misplaced one shows. A mixture's tokens must
    # differ enough to be routed apart (embeddings of std 1, not 0.02, beside the attention
    # biases), its experts be large enough that a token routed elsewhere changes the logits,
    # and GLM's router (initialised to zeros) mild enough beside its expert bias.
    mixture = arch in ("mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if mixture and name.endswith("embed_tokens.weight"):
                p.normal_(0.0, 1.0)
            elif "norm" in name or re.search(r"\bln_(\d|f)\.weight", name):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif ".experts." in name:  # (transformers 5 fuses them: mlp.experts.gate_up_proj)
                p.normal_(0.0, 0.2)
            elif arch == "glm4_moe" and name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.2, 0.2)
    model.save_pretrained(path)
    if arch == "glm4_moe":  # a multi-token-prediction layer, as GLM-4.5's files hold one
        from safetensors.torch import load_file, save_file

        file = os.path.join(path, "model.safetensors")
        tensors = load_file(file)
        tensors["model.layers.2.eh_proj.weight"] = torch.randn(64, 128)
        save_file(tensors, file, metadata={"format": "pt"})
    return model


def hf_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def hf_greedy(path: str, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return out[0, len(prompt) :].tolist()


def model_logits(rank, world, load, tokens, tp, prompt, max_new_tokens, eos):
    """Load ``load`` (megatron checkpoint or HF dir) at TP=tp: logits and a greedy continuation."""
    from megatron_slm.evaluation import load_eval_model
    from megatron_slm.launch import initialize
    from megatron_slm.runtime import forward_logits, greedy_generate

    m = load_eval_model(load, initialize(device="cpu", tensor_model_parallel_size=tp))
    logits = forward_logits(m, tokens)
    (gen,) = greedy_generate(m, [prompt], max_new_tokens=max_new_tokens, eod=eos)
    return logits, gen, m.padded_vocab_size


def convert_all_tp1(rank, world, root, archs, tokens, prompt, max_new_tokens, eos, ppl_data):
    """World of one, per architecture: HF -> megatron (padded for TP=2), logits, greedy and
    perplexity at TP=1, export back to HF, re-import; full state dicts for the round trip."""
    from megatron_slm.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_slm.data.tokenizer import model_digest
    from megatron_slm.evaluation import evaluate_perplexity, load_eval_model, read_documents
    from megatron_slm.launch import initialize

    results = {}
    for arch in archs:
        hf_dir, ckpt = os.path.join(root, arch), os.path.join(root, f"{arch}_ckpt")
        initialize(device="cpu")
        convert_hf_to_megatron(hf_dir, ckpt, tensor_model_parallel_size=2)
        # the imported tokenizer is recorded with the digest of its copy (every later load and
        # export checks the files against it)
        record = _metadata(ckpt)["tokenizer"]
        assert record["sha256"] and record["sha256"] == model_digest(
            record["type"], record["model"]
        )
        logits, gen, padded = model_logits(
            rank, world, ckpt, tokens, 1, prompt, max_new_tokens, eos
        )
        m = load_eval_model(ckpt, initialize(device="cpu"))
        ppl = evaluate_perplexity(
            m, read_documents(ppl_data, m.tokenizer), seq_length=8, micro_batch_size=3
        )
        out = os.path.join(root, f"{arch}_export")
        convert_megatron_to_hf(ckpt, out)
        convert_hf_to_megatron(out, ckpt + "_again", tensor_model_parallel_size=2)
        results[arch] = dict(
            inv_freq=getattr(m.chunks[0], "rotary_pos_emb", None)
            and (m.chunks[0].rotary_pos_emb.inv_freq.clone()),
            logits=logits,
            greedy=gen,
            padded=padded,
            perplexity=ppl.as_dict(),
            state=_full_state(ckpt),
            state_again=_full_state(ckpt + "_again"),
        )
    results["cli"] = _run_convert_cli(
        "megatron-to-hf",
        "--load",
        os.path.join(root, f"{archs[-1]}_ckpt"),
        "--save",
        os.path.join(root, "cli_export"),
        "--max-shard-size",
        "100KB",
    )
    os.makedirs(os.path.join(root, "bad"), exist_ok=True)
    with open(os.path.join(root, archs[0], "config.json")) as f:
        bad = json.load(f)
    bad["architectures"] = ["GPTNeoXForCausalLM"]
    with open(os.path.join(root, "bad", "config.json"), "w") as f:
        json.dump(bad, f)
    results["cli_bad"] = _run_convert_cli(
        "hf-to-megatron", "--load", os.path.join(root, "bad"), "--save", "x"
    )
    return results


def _run_convert_cli(*argv):
    """tools/convert_checkpoint.py's main in this process: (exit status, stdout, stderr)."""
    import contextlib
    import importlib.util
    import io

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(root, "tools", "convert_checkpoint.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = tool.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def tp2_checks(rank, world, root, archs, tokens, prompt, max_new_tokens, eos):
    """World of two: converted checkpoints and the HF directories (in memory) at TP=2 (Mixtral's,
    Qwen2-MoE's and GLM-4.5's also with their experts split over the ranks, EP=2); then a
    conversion run
    with PP=2 (each rank fills its own layers), read back whole."""
    from megatron_slm.convert import convert_hf_to_megatron
    from megatron_slm.launch import initialize

    results = {}
    for arch in archs:
        for source in (f"{arch}_ckpt", arch):
            results[source] = model_logits(
                rank, world, os.path.join(root, source), tokens, 2, prompt, max_new_tokens, eos
            )[:2]
    mixtures = [arch for arch in archs if arch in ("mixtral", "qwen2_moe", "glm4_moe")]
    if mixtures:  # their experts sharded over the two ranks (expert parallelism)
        from megatron_slm.evaluation import load_eval_model
        from megatron_slm.runtime import forward_logits

        dev = initialize(device="cpu", expert_model_parallel_size=2)
        for source in (name for arch in mixtures for name in (f"{arch}_ckpt", arch)):
            lm = load_eval_model(os.path.join(root, source), dev)
            results[f"{source}_ep2"] = forward_logits(lm, tokens)
    pp_ckpt = os.path.join(root, f"{archs[0]}_ckpt_pp2")
    initialize(device="cpu", pipeline_model_parallel_size=2)
    convert_hf_to_megatron(
        os.path.join(root, archs[0]),
        pp_ckpt,
        pipeline_model_parallel_size=2,
        make_vocab_size_divisible_by=256,  # = 128 x TP 2: the padding of the TP=1 run
    )
    results["pp2_state"] = _full_state(pp_ckpt)
    return results if rank == 0 else None


def _full_state(ckpt):
    from megatron_slm.launch import initialize
    from megatron_slm.models.sharding import full_state_dict
    from megatron_slm.runtime import LoadArgs, load_model, plan_load

    lm = load_model(plan_load(LoadArgs(load=ckpt), tokenizer="none"), initialize(device="cpu"))
    return {k: v.clone() for k, v in full_state_dict(lm.chunks[0]).items()}


def random_megatron_roundtrip(rank, world, root, tok_dir):
    """A random megatron model (vocab a multiple of the padding) -> HF -> megatron."""
    from megatron_slm.checkpoint import save_checkpoint
    from megatron_slm.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_slm.launch import initialize
    from megatron_slm.models import GPTModelConfig, ModelBuildOptions, build_model

    initialize(device="cpu", seed=7)
    cfg = GPTModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=384,
        max_position_embeddings=64,
        rotary_base=20000.0,
        norm_epsilon=1e-5,
    )
    chunks = build_model(cfg, ModelBuildOptions(make_vocab_size_divisible_by=128))
    with torch.no_grad():
        for name, p in chunks[0].named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    src = os.path.join(root, "random")
    save_checkpoint(
        src,
        1,
        chunks,
        model_config=cfg,
        metadata={
            "tokenizer": {"type": "HuggingFaceTokenizer", "model": tok_dir, "vocab_size": 300},
            "make_vocab_size_divisible_by": 128,
        },
    )
    hf = os.path.join(root, "random_hf")
    initialize(device="cpu")
    convert_megatron_to_hf(src, hf, max_shard_size="40KB")
    back = os.path.join(root, "random_back")
    convert_hf_to_megatron(hf, back, make_vocab_size_divisible_by=128)
    return _full_state(src), _full_state(back)


# ---------------------------------------------------------------------------------------------
# evaluation: a tiny model trained to answer a tiny QA set
# ---------------------------------------------------------------------------------------------
QA = [
    ("what color is the sky?", "blue"),
    ("how many legs has a cat?", "4"),
    ("what color is grass?", "green"),
    ("what color is the sun?", "yellow"),
    ("how many eyes has a dog?", "2"),
    ("what color is a fox?", "red"),
    ("how many wheels has a car?", "4"),
    ("what does the fox jump over?", "the lazy dog"),
]
NUM_SHOTS = 2


def qa_prompt(question: str, shots) -> str:
    """The few-shot format the QA model learns (lm-eval's: shots joined by a blank line)."""
    parts = [f"Question: {q}\nAnswer: {a}" for q, a in shots]
    return "\n\n".join([*parts, f"Question: {question}\nAnswer:"])


def train_qa_model(rank, world, root, tok_dir, steps=200):
    """Train a tiny megatron GPT (plain torch Adam) to answer QA[NUM_SHOTS:] in the few-shot
    format; save it as a checkpoint; return the final training loss."""
    from megatron_slm.checkpoint import save_checkpoint
    from megatron_slm.data.tokenizer import build_tokenizer
    from megatron_slm.launch import initialize
    from megatron_slm.models import GPTModelConfig, ModelBuildOptions, build_model

    initialize(device="cpu", seed=3)
    tok = build_tokenizer("HuggingFaceTokenizer", tok_dir)
    seqs, masks = [], []
    for q, a in QA[NUM_SHOTS:]:
        prompt = tok.tokenize(qa_prompt(q, QA[:NUM_SHOTS]))
        answer = tok.tokenize(f" {a}\n") + [tok.eod]
        seqs.append(prompt + answer)
        masks.append([0] * (len(prompt) - 1) + [1] * len(answer))
    width = max(map(len, seqs))
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), width - 1)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        tokens[i, : len(s)] = torch.tensor(s)
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
    model_cfg = GPTModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=tok.vocab_size,
        max_position_embeddings=256,
    )
    # Padded vocabulary = vocabulary: megatron's own loss (model(labels=)) is then the plain
    # cross entropy the evaluator computes, an independent check of its perplexity.
    divisible = tok.vocab_size
    (model,) = build_model(model_cfg, ModelBuildOptions(make_vocab_size_divisible_by=divisible))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(inputs.shape[1]).expand_as(inputs)
    for _ in range(steps):
        losses = model(inputs, position_ids, None, labels=labels)  # [b, s]
        loss = (losses * loss_mask).sum() / loss_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(
        os.path.join(root, "qa_ckpt"),
        1,
        [model],
        model_config=model_cfg,
        metadata={
            "tokenizer": {
                "type": "HuggingFaceTokenizer",
                "model": tok_dir,
                "vocab_size": tok.vocab_size,
            },
            "make_vocab_size_divisible_by": divisible,
        },
    )
    return loss.item()


def evaluate_qa_model(rank, world, root, task_dir, ppl_data, seq_length, tasks):
    """Library evaluation of the trained model (perplexity, lm-eval ``tasks`` from ``task_dir``),
    plus the independent perplexity: megatron's own per-token loss (``model(labels=)``) over the
    same segments, exp of its mean."""
    from megatron_slm.evaluation import (
        load_eval_model,
        read_documents,
        run_evaluation,
        segments,
    )
    from megatron_slm.launch import initialize

    m = load_eval_model(os.path.join(root, "qa_ckpt"), initialize(device="cpu"))
    report = run_evaluation(
        m,
        perplexity_data=[ppl_data],
        seq_length=seq_length,
        micro_batch_size=2,
        lm_eval_tasks=tasks,
        lm_eval_options={"include_paths": [task_dir]},
    )
    losses = []
    with torch.no_grad():
        for doc in read_documents(ppl_data, m.tokenizer):
            for seg in segments(doc, seq_length):
                seg = torch.tensor([seg])
                pos = torch.arange(seg.shape[1] - 1)[None]
                losses.append(m.chunks[0](seg[:, :-1], pos, None, labels=seg[:, 1:])[0])
    losses = torch.cat(losses).double()
    return report, len(losses), float(torch.exp(losses.mean()))


def train_and_evaluate(rank, world, root, tok_dir, task_dir, ppl_data, seq_length, steps, tasks):
    loss = train_qa_model(rank, world, root, tok_dir, steps)
    return loss, *evaluate_qa_model(rank, world, root, task_dir, ppl_data, seq_length, tasks)


def make_chat_model(path: str, chat_template: str, seed: int, max_position_embeddings: int) -> str:
    """A tiny random Llama with this file's tokenizer and ``chat_template`` (a ProX model dir)."""
    from transformers import AutoTokenizer

    make_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = chat_template
    tok.save_pretrained(path)
    make_hf_model(
        path, "llama", len(tok), seed=seed, max_position_embeddings=max_position_embeddings
    )
    return path


def _metadata(ckpt: str) -> dict:
    import json

    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
        iteration = int(f.read())
    with open(os.path.join(ckpt, f"iter_{iteration:07d}", "megatron_slm.json")) as f:
        return json.load(f)
