"""The prompts ``tools/prox_refine.py`` sends in each semantics, pinned byte for byte and id for id
for a fixed document and a real Hugging Face tokenizer built here: one token per character, ``<s>``
= 1 and ``</s>`` = 2 as special tokens, a BOS added to plain text (as Llama's tokenizer does), a
Zephyr-style chat template. Every expected id list is derived from the expected text by the
character table below, independently of the code."""

import pytest

from megatron_slm.refine import backends
from megatron_slm.refine.config import ModelConfig
from megatron_slm.refine.decision import Document
from megatron_slm.refine.executor import AcceptanceRule
from megatron_slm.refine.prompts import SYSTEM_PROMPT
from megatron_slm.refine.sources import ModelRefiner

# rows of the docs/design.md table covered here (test_prox_semantics checks the table)
PROMPT_ROWS = {
    "chunk_packing_bos",
    "long_line_chunk",
    "chunk_prompt_special_tokens",
    "doc_prompt_truncation",
    "doc_template",
}

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def ids_of(text):
    """The tokenizer's ids, by hand: ``<s>``/``</s>`` are one token, every other char one."""
    out, i = [], 0
    while i < len(text):
        for special in ("</s>", "<s>"):
            if text.startswith(special, i):
                out.append(VOCAB[special])
                i += len(special)
                break
        else:
            out.append(VOCAB[text[i]])
            i += 1
    return out


def zephyr(user):
    return f"<s><|system|>\n{SYSTEM_PROMPT}</s>\n<|user|>\n{user}</s>\n<|assistant|>\n"


def llama2(user):
    return f"<s>[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n{user} [/INST]"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # decode() joins the characters back
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = TEMPLATE
    path = str(tmp_path_factory.mktemp("char_tokenizer"))
    fast.save_pretrained(path)
    return path


@pytest.fixture
def sent(monkeypatch):
    """The prompts each stage hands its generator (the model's answers: keep)."""
    calls = []

    class Recorder:
        def __init__(self, stage):
            self.stage = stage

        def generate(self, prompts, max_new_tokens):
            calls.append((self.stage, list(prompts)))
            return ["keep_doc()" if self.stage == "doc" else "keep_chunk()"] * len(prompts)

    monkeypatch.setattr(backends, "load_generator", lambda config, stage: Recorder(stage))
    return calls


def refine(model_dir, text, semantics, **options):
    config = ModelConfig(doc_model=model_dir, chunk_model=model_dir, **options)
    refiner = ModelRefiner(config, AcceptanceRule(), semantics)
    return refiner.refine([Document("d.jsonl", 1, {"text": text}, text)])[0]


DOCUMENT = "ab\ncd\n\nefgh"  # numbered: "[000]ab" 7 chars, "[001]cd" 7, "[002]" 5, "[003]efgh" 9


def test_fixture_tokenizer_is_what_the_table_says(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = zephyr("a\nb")
    assert tok(text, add_special_tokens=False)["input_ids"] == ids_of(text)
    assert tok("ab")["input_ids"] == [1, VOCAB["a"], VOCAB["b"]]


def test_strict_prompts_are_text_without_added_tokens(model_dir, sent):
    refine(model_dir, DOCUMENT, "strict", chunk_max_tokens=14)
    (_, [doc]), (_, chunks) = sent
    assert doc == zephyr(DOCUMENT)
    # lines counted without BOS: 7 + 7 <= 14, then 5 + 9 <= 14
    assert chunks == [zephyr("[doc]\n[000]ab\n[001]cd\n[/doc]"),
                      zephyr("[doc]\n[002]\n[003]efgh\n[/doc]")]  # fmt: skip


def test_prox_prompts_are_the_ids_prox_sent(model_dir, sent):
    refine(model_dir, DOCUMENT, "prox", chunk_max_tokens=14)
    (_, [doc]), (_, chunks) = sent
    # document level: the rendered prompt's ids, no token added
    assert doc == ids_of(zephyr(DOCUMENT))
    # chunk_packing_bos: each line counts one BOS more (8, 8, 6, 10): 8 + 8 > 14, 8 + 6 <= 14,
    # 14 + 10 > 14 (strict packs 7 + 7 and 5 + 9)
    bodies = ["[000]ab", "[001]cd\n[002]", "[003]efgh"]
    # chunk_prompt_special_tokens: vLLM's LLM.generate added a BOS before the template's own
    assert chunks == [[1] + ids_of(zephyr(f"[doc]\n{b}\n[/doc]")) for b in bodies]
    assert chunks[0][:2] == [1, 1]


def test_long_line_is_sent_alone_in_prox_mode_only(model_dir, sent):
    text = "ab\n" + "x" * 20 + "\ncd"  # line 1: 25 characters, over the limit of 12
    strict = refine(model_dir, text, "strict", chunk_max_tokens=12, stage="chunk")
    prox = refine(model_dir, text, "prox", chunk_max_tokens=12, stage="chunk")
    (_, strict_chunks), (_, prox_chunks) = sent
    assert strict_chunks == [zephyr("[doc]\n[000]ab\n[/doc]"), zephyr("[doc]\n[002]cd\n[/doc]")]
    lines = ["[000]ab", "[001]" + "x" * 20, "[002]cd"]
    assert prox_chunks == [[1] + ids_of(zephyr(f"[doc]\n{b}\n[/doc]")) for b in lines]
    assert strict.extra["long_lines"] == prox.extra["long_lines"] == [1]


def test_doc_prompt_truncation(model_dir, sent):
    text = "word " * 40
    limit = len(ids_of(zephyr(""))) + 20
    strict = refine(model_dir, text, "strict", doc_max_prompt_tokens=limit, stage="doc")
    prox = refine(model_dir, text, "prox", doc_max_prompt_tokens=limit, stage="doc")
    (_, [strict_doc]), (_, [prox_doc]) = sent
    # strict: the document is cut (20 characters), the template stays whole
    assert strict_doc == zephyr(text[:20])
    # prox: the rendered prompt's ids are cut from the right: the template's end is lost
    assert prox_doc == ids_of(zephyr(text))[:limit]
    assert strict.extra["doc_prompt_truncated"] and prox.extra["doc_prompt_truncated"]


@pytest.mark.parametrize("semantics", ["strict", "prox"])
def test_doc_template_llama2(model_dir, sent, semantics):
    text = "  Line one.\nLine two.  \n"
    refine(model_dir, text, semantics, doc_template="llama2", stage="doc")
    [(_, [doc])] = sent
    # Llama-2-chat strips the system block + message as one string: the trailing spaces and
    # newline go, the leading ones stay (after "\n\n")
    expected = (
        "<s>[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.\n<</SYS>>\n\n"
        "  Line one.\nLine two. [/INST]"
    )
    assert expected == llama2("  Line one.\nLine two.")
    assert doc == (ids_of(expected) if semantics == "prox" else expected)
