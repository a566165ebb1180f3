"""Worker functions for the model-parallel equivalence tests (run in spawned gloo processes).

One step of a tiny GPT (Llama's architecture, or GPT-3's: :func:`architecture`) on a fixed global
batch: per-token losses and gradients under a given TP/PP/DP layout. Weights come from a
megatron-core distributed checkpoint written by the TP=1 reference, so every layout starts from the
same model; gradients are written back as a distributed checkpoint (gradient in place of each
weight) and read back at TP=1, so shards are gathered by megatron-core's own resharding.
"""

from __future__ import annotations

import torch

from megatron_slm.platform import enable_cpu_backend

SEQ, GLOBAL_BATCH, MICRO_BATCH, VOCAB = 32, 8, 1, 512


def global_batch(seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)  # [B, s + 1]


def architecture(name: str):
    """``llama``: the tiny preset; ``gpt3``: its shape with GPT-3's choices (LayerNorm, GeLU,
    learned positions, biases, embeddings tied across the first and last pipeline stage);
    ``qwen``: the preset with each head's query and key normalised and QKV-only biases."""
    from megatron_slm.models import get_preset
    from megatron_slm.models.presets import GPT3_KIND

    tiny = get_preset("tiny")
    if name == "gpt3":
        return tiny.replace(**GPT3_KIND)
    if name == "qwen":
        return tiny.replace(qk_layernorm=True, add_qkv_bias=True)
    return tiny


def _setup(tp: int, pp: int, dtype=torch.float32, vp_layers=None, arch="llama", sp=False,
           stages=(None, None)):  # fmt: skip
    enable_cpu_backend()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_slm.models import ModelBuildOptions, build_model, get_preset

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=(
            get_preset("tiny").num_layers // pp // vp_layers if vp_layers else None
        ),
    )
    model_parallel_cuda_manual_seed(123)
    opts = ModelBuildOptions(
        transformer_impl="torch",
        params_dtype=dtype,
        num_layers_per_virtual_pipeline_stage=vp_layers,
        sequence_parallel=sp,
        first_stage_layers=stages[0],
        last_stage_layers=stages[1],
    )
    return build_model(architecture(arch), opts)


def _sharded_state_dict(chunks):
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    sd = {}
    for i, chunk in enumerate(chunks):
        sd[f"model{i}"] = chunk.sharded_state_dict()
    return sd


def _save(chunks, directory):
    import os

    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(chunks), directory)


def _load(chunks, directory):
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded_state_dict(chunks), directory)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"])


def init_reference(rank, world, directory, arch="llama"):
    """TP=1: build the tiny model and save it as the shared starting point."""
    _save(_setup(1, 1, arch=arch), directory)


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)  # [b, s + 1]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(inputs.shape[1]).expand_as(inputs)
    losses = model(inputs, position_ids, None, labels=labels)  # [b, s] per-token loss

    def loss_func(output):
        # Sum + token count: megatron-core divides by the global token count (per-token loss).
        return (
            output.sum(),
            torch.tensor(output.numel(), dtype=torch.int),
            {"losses": output.detach()},
        )

    return losses, loss_func


def train_step(rank, world, tp, pp, weights_dir, grads_dir, vp_layers=None, arch="llama", sp=False,
               stages=(None, None)):  # fmt: skip
    """One forward/backward on the global batch; returns this rank's layers and, on a last
    stage, this DP rank's per-token losses (else None). ``stages``: the first and last pipeline
    stages' layers (None: an even split)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = _setup(tp, pp, vp_layers=vp_layers, arch=arch, sp=sp, stages=stages)
    _load(chunks, weights_dir)
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    chunks = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync

    dp, dp_rank = (
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_rank(),
    )
    local = global_batch().chunk(dp)[dp_rank]  # [B / dp, s + 1]
    micro_batches = list(local.split(MICRO_BATCH))
    iterators = [iter(micro_batches) for _ in chunks]
    out = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    # Gradients as weights, so the distributed checkpoint gathers them.
    with torch.no_grad():
        for chunk in chunks:
            for p in chunk.module.parameters():
                p.copy_(p.main_grad)
    _save([c.module for c in chunks], grads_dir)
    layers = sum(len(c.module.decoder.layers) for c in chunks)
    if (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
    ):
        return layers, torch.cat([o["losses"] for o in out])  # [B / dp, s]
    return layers, None


def read_full(rank, world, directory, dtype=torch.float32, arch="llama"):
    """Load a distributed checkpoint into the TP=1 model; return its full state dict."""
    chunks = _setup(1, 1, arch=arch)
    _load(chunks, directory)
    return {
        k: v.detach().clone()
        for k, v in chunks[0].state_dict().items()
        if not k.endswith("_extra_state")
    }


def fp64_step(rank, world, weights_dir, arch="llama"):
    """The reference step in float64: per-token losses and full gradients."""
    (model,) = _setup(1, 1, arch=arch)
    _load([model], weights_dir)
    model.double()
    tokens = global_batch()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    losses = model(inputs, torch.arange(SEQ).expand_as(inputs), None, labels=labels)
    losses.mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return losses.detach(), grads
