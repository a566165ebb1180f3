"""Megatron-LM's ``--pipeline-model-parallel-layout``: which layers each (virtual) pipeline stage
holds, written as a string such as ``"Et*3|(tt|)*2t|tL"`` (``E`` the embedding, ``t`` a
transformer layer, ``m`` a multi-token prediction head, ``L`` the output layer and loss, ``|``
between stages; stage ``i`` of ``PP x V`` is virtual stage ``i // PP`` of rank ``i % PP``).

megatron-core parses it (``PipelineParallelLayerLayout``) and builds each chunk's layers from it;
this module checks a string before any work, as megatron-core would, and names the flag."""

from __future__ import annotations

from megatron_slm.errors import ConfigError

LAYOUT_FLAG = "--pipeline-model-parallel-layout"


def parse_pipeline_layout(
    layout: str,
    pipeline_parallel_size: int,
    num_layers: int | None = None,
    mtp_num_layers: int | None = None,
):
    """megatron-core's ``PipelineParallelLayerLayout`` of ``layout``; with ``num_layers``, also
    checked against the model (its decoder layers, the MTP heads; the embedding first and the
    loss last). MTP heads must sit in the last virtual stage of the last rank, where they are
    built here (megatron-core's standalone MTP stages are not offered). ConfigError naming the
    flag otherwise."""
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )

    flag = f"{LAYOUT_FLAG} {layout!r}"
    try:
        parsed = PipelineParallelLayerLayout.from_str(layout, pipeline_parallel_size)
        if num_layers is not None:
            parsed.validate_layer_layout(num_layers, mtp_num_layers)
    except (AssertionError, ValueError, KeyError, SyntaxError, NotImplementedError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"{flag}: {reason}") from None
    if num_layers is not None and mtp_num_layers:
        last = parsed.layout[-1][-1]
        if last.count(LayerType.mtp) != mtp_num_layers:
            raise ConfigError(
                f"{flag}: the MTP heads (m) go in the last stage, with the loss (megatron-core's "
                "standalone MTP stages are not offered)"
            )
    return parsed


def canonical_layout(layout: str | None) -> str | None:
    """``layout`` with its repetitions written out (``"Et*2|t*2L"`` -> ``"Ett|ttL"``): one
    spelling per layout, as the optimizer layout records it."""
    if layout is None:
        return None
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )

    chars = {LayerType.embedding: "E", LayerType.decoder: "t", LayerType.mtp: "m",
             LayerType.loss: "L"}  # fmt: skip
    stages = PipelineParallelLayerLayout.parse_str_to_list(layout)
    return "|".join("".join(chars[layer] for layer in stage) for stage in stages)


def layout_virtual_size(layout: str, pipeline_parallel_size: int) -> int | None:
    """megatron-core's virtual pipeline size of a layout (None: one chunk per rank)."""
    parsed = parse_pipeline_layout(layout, pipeline_parallel_size)
    size = parsed.virtual_pipeline_model_parallel_size
    return size if size > 1 else None
