"""The CPU core attention against an independent float64 attention, and the torch spec against
megatron-core's own local spec on the same weights; the default spec on a GPU without Transformer
Engine is the torch spec, whose unmasked attention asks SDPA for flash attention."""

import sys
from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from torch.utils.flop_counter import FlopCounterMode

from megatron_slm.models import get_preset
from megatron_slm.models.presets import GPT3_KIND
from megatron_slm.models.specs import (
    FusedRoPESelfAttention,
    FusedSwiGLUMLP,
    TorchLayerNorm,
    TorchRMSNorm,
    TorchSDPAttention,
    default_spec_impl,
    gpt_block_spec,
)
from tests.dist_helpers import run_distributed


def _naive_attention(q, k, v, mask):  # q [s, b, n, h], k/v [s, b, g, h], mask True = masked
    n, g = q.shape[2], k.shape[2]
    k = k.repeat_interleave(n // g, dim=2)
    v = v.repeat_interleave(n // g, dim=2)
    scores = torch.einsum("qbnh,kbnh->bnqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(mask, float("-inf"))
    out = torch.einsum("bnqk,kbnh->qbnh", scores.softmax(-1), v)
    return out.reshape(q.shape[0], q.shape[1], -1)


class _Config:
    context_parallel_size = 1
    attention_dropout = 0.0


def _attention(window: int | None = None, mask_type=AttnMaskType.causal):
    attn = TorchSDPAttention.__new__(TorchSDPAttention)
    torch.nn.Module.__init__(attn)
    attn.attn_mask_type, attn.dropout_p, attn.softmax_scale = mask_type, 0.0, None
    attn.window = None if window is None else (window, 0)
    return attn


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_causal_gqa_attention_matches_naive(groups):
    g = torch.Generator().manual_seed(0)
    s, b, n, h = 7, 2, 4, 8
    q = torch.randn(s, b, n, h, generator=g, dtype=torch.float64)
    k = torch.randn(s, b, groups, h, generator=g, dtype=torch.float64)
    v = torch.randn(s, b, groups, h, generator=g, dtype=torch.float64)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    out = _attention()(q, k, v, None)
    torch.testing.assert_close(out, _naive_attention(q, k, v, causal))


@pytest.mark.parametrize("groups", [1, 2])
def test_block_diagonal_mask_isolates_documents(groups):
    g = torch.Generator().manual_seed(1)
    s, b, n, h = 6, 1, 2, 4
    q = torch.randn(s, b, n, h, generator=g, dtype=torch.float64)
    k, v = (torch.randn(s, b, groups, h, generator=g, dtype=torch.float64) for _ in range(2))
    doc = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = (doc[:, None] != doc[None, :]) | torch.ones(s, s, dtype=torch.bool).triu(1)
    out = _attention()(q, k, v, mask[None, None])
    # The second document alone, from its own start, gives the same outputs.
    alone = _attention()(q[3:], k[3:], v[3:], None)
    torch.testing.assert_close(out[3:], alone)
    torch.testing.assert_close(out, _naive_attention(q, k, v, mask))


def test_sliding_window_attention_matches_naive():
    """``--window-size 2,0``: each query sees itself and the 2 keys before it, also as the last
    queries of a longer key (a KV-cache step) and inside a document mask; a window as wide as the
    sequence builds no mask at all."""
    g = torch.Generator().manual_seed(2)
    s, b, n, groups, h = 8, 2, 4, 2, 8
    q = torch.randn(s, b, n, h, generator=g, dtype=torch.float64)
    k, v = (torch.randn(s, b, groups, h, generator=g, dtype=torch.float64) for _ in range(2))
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    band = (j > i) | (j < i - 2)
    torch.testing.assert_close(_attention(window=2)(q, k, v, None), _naive_attention(q, k, v, band))
    step = _attention(window=2, mask_type=AttnMaskType.no_mask)(q[-3:], k, v, None)
    torch.testing.assert_close(step, _naive_attention(q, k, v, band)[-3:])
    doc = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    docs = (doc[:, None] != doc[None, :]) | (j > i)
    out = _attention(window=2)(q, k, v, docs[None, None])
    torch.testing.assert_close(out, _naive_attention(q, k, v, docs | band))
    assert _attention(window=s - 1)._outside_window(s, s, "cpu") is None
    torch.testing.assert_close(_attention(window=s - 1)(q, k, v, None), _attention()(q, k, v, None))


def test_unmasked_attention_is_causal_sdpa_without_expanded_heads(monkeypatch):
    """No mask tensor, is_causal and unexpanded grouped heads: what SDPA's flash kernel takes."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((attn_mask, is_causal, k.shape[1], kwargs.get("enable_gqa", False)))
        return sdpa(q, k, v, attn_mask, dropout_p, is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v = torch.randn(5, 2, 4, 8), torch.randn(5, 2, 2, 8), torch.randn(5, 2, 2, 8)
    _attention()(q, k, v, None)
    assert calls == [(None, True, 2, True)]


def test_eval_mode_attention_leaves_cudnn_out(monkeypatch):
    """A model in eval mode (the scorer, generation, evaluation, the online reference) runs SDPA
    with its cuDNN backend off (one graph build per shape there), and the flag comes back; in
    train mode the user's setting stays, with or without a graph (activation recompute's first
    pass runs without one, and its recompute must use the same kernel)."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v = torch.randn(5, 2, 4, 8), torch.randn(5, 2, 2, 8), torch.randn(5, 2, 2, 8)
    attn = _attention().eval()
    with torch.no_grad():
        scored = attn(q, k, v, None)
    with torch.inference_mode():
        attn(q, k, v, None)
    attn(q, k, v, None)
    attn.train()
    trained = attn(q.clone().requires_grad_(), k, v, None)
    with torch.no_grad():
        attn(q, k, v, None)  # recompute's first pass
    assert seen == [False, False, False, True, True]
    assert torch.backends.cuda.cudnn_sdp_enabled()
    torch.testing.assert_close(scored, trained.detach())
    try:  # a user who turned cuDNN attention off keeps it off, in both modes
        torch.backends.cuda.enable_cudnn_sdp(False)
        attn(q.clone().requires_grad_(), k, v, None)
        attn.eval()(q, k, v, None)
        assert seen[-2:] == [False, False] and not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_gpu_without_transformer_engine_defaults_to_torch_spec(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import fails: no TE
    impl = default_spec_impl(torch.device("cuda"))
    assert impl == "torch"
    # Two layers on this stage (the real count needs an initialised pipeline layout).
    monkeypatch.setattr(
        "megatron_slm.models.specs.get_num_layers_to_build", lambda config, vp_stage=None: 2
    )
    monkeypatch.setattr(
        "megatron_slm.models.specs.get_transformer_layer_offset", lambda config, vp_stage=None: 0
    )
    config = SimpleNamespace(normalization="RMSNorm", num_layers=2)
    block = gpt_block_spec(impl, config=config)
    for layer in block.layer_specs:
        assert layer.submodules.self_attention.module is FusedRoPESelfAttention
        assert layer.submodules.self_attention.submodules.core_attention is TorchSDPAttention
        assert layer.submodules.input_layernorm is TorchRMSNorm
    assert block.layer_norm is TorchRMSNorm
    assert default_spec_impl(torch.device("cpu")) == "torch"


def tiny_torch_and_local_models(arch=None):
    """In a spawned rank (CPU): ``arch`` (default: the tiny preset) with the torch spec, and with
    megatron-core's local spec holding the same weights."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_slm.models import ModelBuildOptions, build_model, get_preset
    from megatron_slm.platform import enable_cpu_backend

    enable_cpu_backend()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(5)
    arch = arch or get_preset("tiny")
    (ours,) = build_model(arch, ModelBuildOptions(transformer_impl="torch"))
    (local,) = build_model(arch, ModelBuildOptions(transformer_impl="local"))
    local.load_state_dict(ours.state_dict(), strict=False)
    return ours, local


def count_fused_rope_calls() -> list:
    """In a spawned rank: from now on, the input shape of every fused RoPE kernel call is
    appended to the returned list."""
    import megatron_slm.ops.rope as rp

    calls, fused_rope = [], rp._FusedRoPE

    class CountedRoPE(fused_rope):
        @staticmethod
        def forward(ctx, t, cos, sin):
            calls.append(tuple(t.shape))
            return fused_rope.forward(ctx, t, cos, sin)

    rp._FusedRoPE = CountedRoPE
    return calls


def _torch_vs_local_spec(rank, world, arch):
    import functools

    import megatron_slm.models.specs as specs

    # the fused SwiGLU's kernels, as on a GPU (on the CPU impl="auto" is the reference)
    specs.swiglu = functools.partial(specs.swiglu, impl="fused")
    rope_calls = count_fused_rope_calls()  # the fused RoPE is the default on the CPU too
    import logging

    from megatron.core import parallel_state

    warnings = []  # what megatron-core's TransformerLayer logs while the models are built
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("megatron.core.transformer.transformer_layer").addHandler(handler)
    ours, local = tiny_torch_and_local_models(arch)
    assert not [w for w in warnings if "Unknown MLP type" in w], warnings
    tp_group = parallel_state.get_tensor_model_parallel_group()
    assert all(layer.mlp.tp_group is tp_group for layer in ours.decoder.layers)
    norm = TorchRMSNorm if arch.normalization == "RMSNorm" else TorchLayerNorm
    for layer in ours.decoder.layers:
        assert isinstance(layer.self_attention, FusedRoPESelfAttention)
        assert layer.self_attention.fused_rope
        assert isinstance(layer.self_attention.core_attention, TorchSDPAttention)
        assert isinstance(layer.mlp, FusedSwiGLUMLP) and layer.mlp.fused == arch.gated
        assert type(layer.input_layernorm) is norm and type(layer.pre_mlp_layernorm) is norm
    assert type(ours.decoder.final_layernorm) is norm
    for layer in ours.decoder.layers if arch.qk_layernorm else ():
        assert type(layer.self_attention.q_layernorm) is norm
        assert type(layer.self_attention.k_layernorm) is norm
    n_params = [sum(p.numel() for p in m.parameters()) for m in (ours, local)]
    assert n_params == [arch.num_parameters(512)] * 2
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    out = []
    for model in (ours, local):  # per-token losses, and every parameter's gradient of their sum
        with FlopCounterMode(display=False) as counter:
            losses = model(tokens, pos, None, labels=tokens)
            losses.sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        out.append((losses.detach(), grads, counter.get_total_flops()))
        if model is ours:  # the query and the key of every layer, through the fused kernel
            whole = arch.position_embedding_type == "rope" and arch.rotary_percent == 1.0
            rotated = 2 * len(ours.decoder.layers) if whole else 0  # (partial: the reference)
            assert len(rope_calls) == rotated, rope_calls
    return out


GPT3_TINY = get_preset("tiny").replace(**GPT3_KIND)
# Qwen's additions: each head's query and key normalised (Qwen3), QKV-only biases (Qwen2), tied,
# and heads wider than the width's share (Qwen3-0.6B's: 4 heads of 32 on a width of 64).
QWEN_TINY = get_preset("tiny").replace(
    qk_layernorm=True, add_qkv_bias=True, tied_embeddings=True, kv_channels=32
)


@pytest.mark.parametrize(
    "arch",
    [get_preset("tiny"), GPT3_TINY, QWEN_TINY, GPT3_TINY.replace(activation="openai_gelu"),
     GPT3_TINY.replace(activation="squared_relu", tied_embeddings=False),
     get_preset("tiny").replace(rotary_percent=0.5), get_preset("tiny").replace(window_size=5)],
    ids=["llama", "gpt3", "qwen", "gpt2", "squared-relu", "partial-rope", "sliding-window"],
)  # fmt: skip
def test_torch_spec_matches_megatron_local_spec(arch):
    """The torch spec (SDPA, torch's RMSNorm or LayerNorm, the fused SwiGLU and RoPE) against
    megatron-core's local spec (its unfused SwiGLU and RoPE among them) on the same weights:
    losses and gradients, for Llama's architecture, GPT-3's (LayerNorm, GeLU, learned
    positions, biases, tied embeddings) and Qwen's additions (QK norm, QKV biases, heads that
    do not split the width); ``num_parameters`` is the models' count.

    And what MFU and --log-progress count, ``GPTModelConfig.flops_per_token``: forward and
    backward of every matrix product (torch's FLOP counter on the local spec, whose attention
    multiplies the whole s x s scores) less the half of the attention products that the causal
    mask discards (Megatron-LM's convention)."""
    (((ours, ours_grads, _), (local, local_grads, flops)),) = run_distributed(
        _torch_vs_local_spec, 1, arch
    )
    batch, seq = ours.shape
    width = arch.num_attention_heads * arch.head_dim  # the queries' (h unless --kv-channels)
    masked = 3 * arch.num_layers * 2 * seq * width  # above the diagonal, fwd + bwd
    assert flops == batch * seq * (arch.flops_per_token(seq) + masked)
    torch.testing.assert_close(ours, local, rtol=1e-5, atol=1e-5)
    assert ours_grads.keys() == local_grads.keys() and any("linear_fc1" in n for n in ours_grads)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, local_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def _fused_rope_attention_against_megatron(rank, world):
    """In a spawned rank: FusedRoPESelfAttention and megatron-core's SelfAttention with the same
    weights (GQA, q/k norms): training calls through the kernel, a KV-cache prefill and decode
    step and a rotary pair with no key half through megatron-core's own path."""
    from megatron.core import parallel_state
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_slm.platform import enable_cpu_backend

    enable_cpu_backend()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(3)
    calls = count_fused_rope_calls()
    cfg = TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        use_cpu_initialization=True, add_bias_linear=False, qk_layernorm=True,
        normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, masked_softmax_fusion=False,
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=True)
    spec = spec.submodules.self_attention
    mask_type = spec.params["attn_mask_type"]
    ref = SelfAttention(cfg, spec.submodules, layer_number=1, attn_mask_type=mask_type)
    ours = FusedRoPESelfAttention(cfg, spec.submodules, layer_number=1, attn_mask_type=mask_type)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():  # norms that are not the identity
        for m in (ref, ours):
            for n, p in m.named_parameters():
                if "layernorm" in n:
                    p.copy_(torch.linspace(0.5, 1.5, p.numel()).view_as(p))
    freqs = RotaryEmbedding(16, 1.0)(10)
    x = torch.randn(10, 2, 64, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, m in (("ref", ref), ("ours", ours)):
        xx = x.clone().requires_grad_()
        y, _ = m(xx, attention_mask=None, rotary_pos_emb=freqs)
        y.sum().backward()
        half, _ = m(x, attention_mask=None, rotary_pos_emb=(freqs, None))
        out[name] = [y.detach(), xx.grad, half.detach()]
        n_trained = len(calls)
        m.eval()
        ctx = StaticInferenceContext(2, 10)
        with torch.no_grad():
            out[name].append(m(x[:6], None, inference_context=ctx, rotary_pos_emb=freqs)[0])
            ctx.increment_sequence_len_offset(6)
            out[name].append(m(x[6:7], None, inference_context=ctx, rotary_pos_emb=freqs)[0])
        assert len(calls) == n_trained  # the KV-cache path: megatron-core's RoPE
    assert calls == [(10, 2, 4, 16), (10, 2, 2, 16), (10, 2, 4, 16)], calls
    return out


def test_fused_rope_attention_matches_megatron_and_falls_back():
    (out,) = run_distributed(_fused_rope_attention_against_megatron, 1)
    for i, (ours, ref) in enumerate(zip(out["ours"], out["ref"])):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6, msg=str(i))


def _zero_centred_norms(rank, world, kind):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_slm.models import ModelBuildOptions, build_model
    from megatron_slm.platform import enable_cpu_backend

    enable_cpu_backend()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(5)
    arch = get_preset("tiny").replace(**kind)
    opts = ModelBuildOptions(transformer_impl="torch")
    (one_p,) = build_model(arch.replace(apply_layernorm_1p=True), opts)
    (plain,) = build_model(arch, opts)
    norms = [n for n, _ in one_p.named_parameters() if "norm" in n and n.endswith("weight")]
    fresh = all(not one_p.get_parameter(n).any() for n in norms)  # gamma - 1 starts at 0
    with torch.no_grad():
        for n, p in one_p.named_parameters():
            if n in norms:
                p.uniform_(-0.5, 0.5)
    state = {n: t + 1 if n in norms else t for n, t in one_p.state_dict().items()}
    plain.load_state_dict(state)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    return fresh, len(norms), [m(tokens, pos, None, labels=tokens) for m in (one_p, plain)]


@pytest.mark.parametrize("kind", [{"normalization": "LayerNorm"}, {"qk_layernorm": True}],
                         ids=["layernorm", "rmsnorm-qk-norm"])  # fmt: skip
def test_layernorm_1p_is_the_norm_of_weight_plus_one(kind):
    """--apply-layernorm-1p (the torch spec's norms): a model whose norm weights are ``w`` gives
    the losses of the plain model whose weights are ``w + 1`` (every norm: the layers', the
    final one and the QK norms); its norm weights start at 0."""
    ((fresh, n_norms, (ours, plain)),) = run_distributed(_zero_centred_norms, 1, kind)
    layers = get_preset("tiny").num_layers
    assert fresh and n_norms == 2 * layers + 1 + (2 * layers if kind.get("qk_layernorm") else 0)
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)


def _xavier_and_normal_weights(rank, world):
    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model

    dev = launch.initialize(device="cpu", seed=4)
    arch = get_preset("tiny").replace(num_layers=2, vocab_size=640)
    out = {}
    for xavier in (True, False):
        opts = ModelBuildOptions(transformer_impl="torch", xavier_uniform_init=xavier)
        (model,) = build_model(arch, opts, dev)
        out[xavier] = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    return out


def test_xavier_uniform_init_is_megatron_lms():
    """--init-method-xavier-uniform: every matrix (QKV, projections, MLP, embedding, output
    layer) uniform within Xavier's bound sqrt(6 / (fan_in + fan_out)) with its variance
    bound^2 / 3; without it, the normal of std 0.02 (its output projections scaled down)."""
    ((out),) = run_distributed(_xavier_and_normal_weights, 1)
    xavier, normal = out[True], out[False]
    assert any("embedding" in n for n in xavier) and any("linear_fc2" in n for n in xavier)
    for name, w in xavier.items():
        bound = (6 / sum(w.shape)) ** 0.5
        assert w.abs().max() <= bound, name
        assert w.var().item() == pytest.approx(bound**2 / 3, rel=0.1), name
    emb = normal["embedding.word_embeddings.weight"]
    assert emb.std().item() == pytest.approx(0.02, rel=0.05)  # (Xavier's: 0.053 here)


def _query_key_layer_scaling(rank, world):
    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model

    dev = launch.initialize(device="cpu", seed=4)
    arch = get_preset("tiny").replace(num_layers=2)
    tokens = torch.randint(0, 500, (2, 16))
    out, weights = {}, None
    for scaled in (False, True):
        opts = ModelBuildOptions(transformer_impl="local", apply_query_key_layer_scaling=scaled)
        (model,) = build_model(arch, opts, dev)
        if weights is None:
            weights = model.state_dict()
        model.load_state_dict(weights, strict=False)
        attention = [layer.self_attention.core_attention for layer in model.decoder.layers]
        with torch.no_grad():
            logits = model.eval()(tokens, torch.arange(16)[None], None)
        out[scaled] = logits, [a.softmax_scale for a in attention]
    return out


def test_query_key_layer_scaling_is_the_same_attention():
    """--apply-query-key-layer-scaling reaches megatron-core's own attention (layer n divides
    Q.K^T by n more, and its fp32 softmax multiplies it back): the same logits."""
    ((out),) = run_distributed(_query_key_layer_scaling, 1)
    (plain, plain_scales), (scaled, scaled_scales) = out[False], out[True]
    assert scaled_scales == [plain_scales[0], plain_scales[1] / 2]  # (layers 1 and 2)
    torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-5)
