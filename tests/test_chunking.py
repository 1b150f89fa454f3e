"""Long documents read whole: where chunks are cut, and what the service reports for them."""

from __future__ import annotations

import asyncio
import re

import pytest
from conftest import CHINESE, english_texts
from transformers import AutoTokenizer

from prism_ray.api import ChunkingOptions, EvidenceOptions, RerankJob
from prism_ray.chunking import chunk_documents, split
from prism_ray.config import AppConfig
from prism_ray.engine import ScoreEngine, load_model
from prism_ray.errors import ErrorKind, PrismError
from prism_ray.prompt import PrismPromptTokenizer
from prism_ray.results import EvidenceResult, ScoreReply, Timing
from prism_ray.service import RerankService

QUERY = "What is the boiling point of water at sea level?"
LONG = " ".join(english_texts(12, 80, 160))  # ~1,500 words
TOL = 1e-5


@pytest.fixture(scope="module")
def prompts(tiny_ckpt):
    return PrismPromptTokenizer(AutoTokenizer.from_pretrained(tiny_ckpt), max_length=512)


def _split(prompts, text, chunk_tokens, overlap, max_chunks):
    return split(text, chunk_tokens, overlap, max_chunks, prompts.document_token_starts,
                 lambda s: len(prompts.document(s)))


def test_chunks_cut_at_whitespace_fit_overlap_and_cover_the_text(prompts):
    out = _split(prompts, LONG, chunk_tokens=120, overlap=20, max_chunks=1000)
    assert not out.truncated and len(out.chunks) > 5
    for c in out.chunks:
        assert c.start == 0 or LONG[c.start - 1].isspace()  # never inside a word
        assert c.end == len(LONG) or LONG[c.end].isspace()
        assert not LONG[c.start].isspace() and not LONG[c.end - 1].isspace()
        assert len(prompts.document(LONG[c.start:c.end])) <= 120  # tokenized on its own
    for a, b in zip(out.chunks, out.chunks[1:]):
        assert a.start < b.start < a.end  # consecutive chunks overlap and move on
    assert out.chunks[0].start == 0 and out.chunks[-1].end == len(LONG.rstrip())


def test_text_without_spaces_is_cut_between_characters(prompts):
    text = "".join(CHINESE) * 12
    out = _split(prompts, text, chunk_tokens=40, overlap=8, max_chunks=1000)
    assert len(out.chunks) > 3 and not out.truncated
    for c in out.chunks:
        assert len(prompts.document(text[c.start:c.end])) <= 40
    assert out.chunks[-1].end == len(text)
    mixed = "Ray Serve 支持 autoscaling：副本数在 min_replicas 和 max_replicas 之间变化。" * 20
    words = {m.span() for m in re.finditer(r"[A-Za-z_]+", mixed)}
    for c in _split(prompts, mixed, chunk_tokens=30, overlap=5, max_chunks=1000).chunks:
        assert all(not (s < c.start < e) and not (s < c.end < e) for s, e in words)  # Latin words stay whole


def test_a_document_that_fits_is_one_chunk_the_whole_text(prompts):
    doc = "  Water boils at 100 degrees Celsius.\n"
    [out] = chunk_documents(prompts, QUERY, [doc], max_chunks_per_doc=4)
    assert [(c.start, c.end) for c in out.chunks] == [(0, len(doc))] and not out.truncated


def test_at_most_max_chunks_then_truncated(prompts):
    out = _split(prompts, LONG, chunk_tokens=100, overlap=10, max_chunks=3)
    assert len(out.chunks) == 3 and out.truncated
    assert out.chunks == _split(prompts, LONG, chunk_tokens=100, overlap=10, max_chunks=1000).chunks[:3]


# -- the service, with a real engine behind its scorer ------------------------------------------------------

def _service(ckpt, engine, evidence_calls=None, **limits):
    config = AppConfig.model_validate({"models": [{"name": "m", "model": str(ckpt), "max_length": 512}],
                                       "limits": {"max_chunks_per_doc": 16, "max_chunks_per_request": 40, **limits}})

    async def score(model, query, documents, max_doc_tokens):
        return ScoreReply(engine.score([(query, documents)], max_doc_tokens)[0], Timing(compute_ms=0.0))

    async def evidence(model, query, document, max_new_tokens):
        evidence_calls.append(document)
        return EvidenceResult(score=0.5, logit=0.0, relevant=True, contribution="c", evidence="e", text="t",
                              truncated=False, num_tokens=1, prompt_truncated=False, generated_tokens=1)

    prompts = {"m": PrismPromptTokenizer(AutoTokenizer.from_pretrained(ckpt), max_length=512)}
    return RerankService(config, prompts, score=score, evidence=evidence)


def _job(docs, **kw):
    return RerankJob(shape=kw.pop("shape", "cohere"), model=None, query=QUERY, documents=list(docs),
                     documents_field="documents", **kw)


@pytest.fixture(scope="module")
def engines(tiny_ckpt, qwen3_ckpt):
    return {str(p): ScoreEngine(load_model(p, dtype="float32", max_length=512)) for p in (tiny_ckpt, qwen3_ckpt)}


def test_best_chunk_span_scored_alone_gives_the_reported_score(any_ckpt, engines):
    engine = engines[str(any_ckpt)]
    svc = _service(any_ckpt, engine)
    short = "Water boils at 100 degrees Celsius at sea level."
    docs = [LONG, short, LONG[3000:]]
    job = _job(docs, chunking=ChunkingOptions(max_chunks_per_doc=8, chunk_tokens=150))
    body, ranked = asyncio.run(svc.respond(job, svc.prepare(job)))
    by_index = {r.index: r for r in ranked}
    for i, doc in enumerate(docs):
        r = by_index[i]
        s, e = r.chunk["start"], r.chunk["end"]
        alone = engine.score_pairs(QUERY, [doc[s:e]])[0].score
        assert abs(alone - r.score) <= TOL
    plain = engine.score_pairs(QUERY, [short])[0].score
    assert by_index[1].chunk == {"index": 0, "count": 1, "start": 0, "end": len(short)}
    assert abs(by_index[1].score - plain) <= TOL  # one chunk: the whole text, scored as without chunking
    assert by_index[0].chunk["count"] == 8 and by_index[0].truncated  # LONG needs more than 8 chunks
    assert [r["chunk"] for r in body["results"]] == [r.chunk for r in ranked]
    assert body["meta"]["warnings"] and body["meta"]["warnings"][0].startswith("documents.")


def test_without_chunking_no_chunk_key_anywhere(tiny_ckpt, engines):
    svc = _service(tiny_ckpt, engines[str(tiny_ckpt)])
    for shape in ("cohere", "jina", "tei"):
        job = _job([LONG, "short"], shape=shape)
        body, _ = asyncio.run(svc.respond(job, svc.prepare(job)))
        assert "chunk" not in str(body)


def test_evidence_is_generated_for_the_best_chunk(tiny_ckpt, engines):
    calls: list[str] = []
    svc = _service(tiny_ckpt, engines[str(tiny_ckpt)], evidence_calls=calls)
    job = _job([LONG], chunking=ChunkingOptions(max_chunks_per_doc=4, chunk_tokens=100),
               evidence=EvidenceOptions(top_n=1))
    _, [r] = asyncio.run(svc.respond(job, svc.prepare(job)))
    assert calls == [LONG[r.chunk["start"]:r.chunk["end"]]] and len(calls[0]) < len(LONG)


def test_chunk_limits_name_the_field(tiny_ckpt, engines):
    svc = _service(tiny_ckpt, engines[str(tiny_ckpt)])
    with pytest.raises(PrismError) as err:
        svc.prepare(_job([LONG], chunking=ChunkingOptions(max_chunks_per_doc=17)))
    assert err.value.kind == ErrorKind.BAD_REQUEST and err.value.param == "chunking.max_chunks_per_doc"
    assert "max_chunks_per_doc" in err.value.message and "16" in err.value.message
    with pytest.raises(PrismError) as err:
        svc.prepare(_job([LONG] * 4, chunking=ChunkingOptions(max_chunks_per_doc=16, chunk_tokens=60)))
    assert err.value.kind == ErrorKind.TOO_LARGE and "max_chunks_per_request" in err.value.message


def test_the_chunk_token_budget_refuses_past_it_without_reading_on(tiny_ckpt, engines):
    """max_chunk_tokens_per_request counts chunks x their size: a request whose chunks hold exactly the
    budget is chunked as without it; a budget that leaves a long document 4 of its 16 chunks is a 413
    naming the field, and that document is read only about 5 chunks far, not 16."""
    big = (LONG + " ") * 30  # ~45,000 words: far more than 16 chunks of 60 tokens
    within = _job([LONG[:1200], LONG[1200:2400], big], chunking=ChunkingOptions(max_chunks_per_doc=16, chunk_tokens=60))

    def prepared(budget=None):
        """The chunks (or the error) and the longest text tokenized on the way."""
        svc = _service(tiny_ckpt, engines[str(tiny_ckpt)],
                       **({} if budget is None else {"max_chunk_tokens_per_request": budget}))
        prompts, seen = svc.preparer.prompts["m"], [0]
        real = prompts._text.encode_batch
        prompts._text.encode_batch = lambda texts, **kw: (seen.extend(len(t) for t in texts), real(texts, **kw))[1]
        try:
            return svc.prepare(within).chunked, max(seen)
        except PrismError as exc:
            return exc, max(seen)
        finally:
            prompts._text.encode_batch = real

    unlimited, read_whole = prepared()
    small = len(unlimited[0].chunks) + len(unlimited[1].chunks)
    assert len(unlimited[2].chunks) == 16
    count = small + 16
    assert prepared(60 * count)[0] == unlimited
    err, read = prepared(60 * (small + 4))
    assert isinstance(err, PrismError) and err.kind == ErrorKind.TOO_LARGE and err.param == "chunking"
    assert "max_chunk_tokens_per_request" in err.message and f"{60 * (small + 4)} tokens" in err.message
    assert f"more than {small + 4} chunks of up to 60 tokens" in err.message
    assert read < 0.6 * read_whole, (read, read_whole)  # about 5 of the 16 chunks' text


def test_chunks_of_a_long_document_read_only_what_they_reach(prompts):
    """The chunker reads a cut of a long document, and its chunks equal the whole text's (split over the
    whole tokenization), for prose, CJK, one enormous word at the start, and text past max_chunks."""
    docs = [LONG * 30, "".join(CHINESE) * 300, "x" * 20_000 + " " + LONG * 10, LONG + " " + "y" * 30_000,
            (LONG[:2000] + " ") * 40]
    seen: list[int] = []
    real = prompts._text.encode_batch
    prompts._text.encode_batch = lambda texts, **kw: (seen.extend(len(t) for t in texts), real(texts, **kw))[1]
    try:
        for chunk_tokens, max_chunks in ((120, 4), (60, 1), (200, 9)):
            got = chunk_documents(prompts, QUERY, docs, max_chunks, chunk_tokens, 20)
            for doc, out in zip(docs, got):
                whole = split(doc, chunk_tokens, 20, max_chunks, prompts.document_token_starts,
                              lambda s: len(prompts.encode_text(" " + s)))
                assert out == whole, (chunk_tokens, max_chunks, doc[:30])
        seen.clear()
        chunk_documents(prompts, QUERY, [docs[0]], 4, 120, 20)
    finally:
        prompts._text.encode_batch = real
    assert max(seen) < len(docs[0]) / 20  # 4 chunks of a 246 k-character document read a few k characters
