"""Document attention on CUDA: the default FlexAttention path against SDPA with the dense mask
(fp32, bf16; grouped heads; a sequence that is not a multiple of the 128-position block), and a
new micro-batch's block mask and attention under ``set_sync_debug_mode("error")``."""

from __future__ import annotations

import pytest
import torch

from megatron_slm.models.document_mask import (
    ENV,
    DocumentMask,
    _Flex,
    document_attention_backend,
)
from tests.unit.models.test_document_mask import EOD, _tokens
from tests.unit.models.test_specs import _attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_is_the_default_and_matches_dense(dtype, monkeypatch, no_host_sync):
    monkeypatch.delenv(ENV, raising=False)
    assert document_attention_backend(torch.device("cuda")) == "flex"
    g = torch.Generator().manual_seed(0)
    s, b, n, groups, h = 1000, 3, 8, 2, 64
    q = torch.randn(s, b, n, h, generator=g).to("cuda", dtype)
    k, v = (torch.randn(s, b, groups, h, generator=g).to("cuda", dtype) for _ in range(2))
    tokens = _tokens(b, s, 4).cuda()
    mask = DocumentMask.from_tokens(tokens, EOD)
    with torch.no_grad():
        out = _attention()(q, k, v, mask)
        assert _Flex.failed is None, _Flex.failed  # flex ran (no fallback to the dense mask)
        assert _Flex.works and mask._dense is None
        monkeypatch.setenv(ENV, "dense")
        dense = _attention()(q, k, v, DocumentMask.from_tokens(tokens, EOD))
        monkeypatch.delenv(ENV)
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
        torch.testing.assert_close(out.float(), dense.float(), rtol=tol, atol=tol)
        # Compiled now: another micro-batch costs the host no wait.
        other = _tokens(b, s, 5).cuda()
        with no_host_sync():
            _attention()(q, k, v, DocumentMask.from_tokens(other, EOD))
        torch.cuda.synchronize()
