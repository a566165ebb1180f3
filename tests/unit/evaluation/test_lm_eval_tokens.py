"""lm-eval's requests tokenized by our adapter on a Llama2Tokenizer checkpoint (no Hugging Face
tokenizer behind it) equal those of the Hugging Face tokenizer the checkpoint exports, which is
what lm-eval's ``hf`` model tokenizes with: the context leads with BOS, the continuation is the
rest of the whole text's ids, and an empty context is the BOS prefix alone."""

from __future__ import annotations

import pytest

from megatron_slm.data import build_tokenizer, train_sentencepiece

pytest.importorskip("lm_eval")

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Numbers 12345 and café."] * 10
PAIRS = [("The quick brown", " fox jumps"), ("Numbers", " 12345 and café."), ("", "lazy dog")]


def test_requests_tokenize_as_the_exported_tokenizer(tmp_path):
    from types import SimpleNamespace

    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from transformers import AutoTokenizer

    from megatron_slm.convert.tokenizer_export import write_sentencepiece_hf_tokenizer
    from megatron_slm.data.chat import DEFAULT_CHAT_TEMPLATE
    from megatron_slm.evaluation.lm_eval_model import MegatronSLMLM

    model = train_sentencepiece(TEXTS, str(tmp_path / "sp"), 300)
    tok = build_tokenizer("Llama2Tokenizer", model)
    (tmp_path / "hf").mkdir()
    hf_dir = str(tmp_path / "hf")
    write_sentencepiece_hf_tokenizer(model, hf_dir, DEFAULT_CHAT_TEMPLATE, add_bos=True)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    seen = []

    class Adapter(MegatronSLMLM):
        def __init__(self):
            TemplateLM.__init__(self)
            self._hf, self.lm = None, SimpleNamespace(tokenizer=tok)

        def _loglikelihood_tokens(self, requests, **unused):
            seen.extend(requests)
            return [(0.0, True)] * len(requests)

    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    Adapter().loglikelihood(requests)
    assert [pair for pair, *_ in seen] == PAIRS
    for (context, continuation), context_ids, continuation_ids in seen:
        if context:
            assert context_ids == hf(context).input_ids and context_ids[0] == tok.bos
            assert context_ids + continuation_ids == hf(context + continuation).input_ids
        else:
            assert context_ids == [hf.bos_token_id] == [tok.bos]
            assert continuation_ids == hf(continuation, add_special_tokens=False).input_ids
