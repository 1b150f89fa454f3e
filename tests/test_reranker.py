"""`prism_ray.Reranker`, the Python front door, against path A (the model card's reference: transformers'
own generate over the same checkpoint, `tests/reference.py`) in float32."""

from __future__ import annotations

import asyncio

import pytest
import reference
from conftest import english_texts

from prism_ray import Reranker
from prism_ray.ranking import best_first

TOL = 1e-5
QUERY = "What is the boiling point of water?"
DOCS = ["Water boils at 100 degrees Celsius at sea level.", "Paris is the capital of France.",
        "At high altitude water boils at a lower temperature.", "水在海平面的沸点是摄氏100度。"]


@pytest.fixture(scope="module")
def reranker(tiny_ckpt):
    return Reranker(tiny_ckpt, dtype="float32")


def _path_a(ckpt, query: str, doc: str, max_new_tokens: int = 1) -> dict:
    return reference.path_a(str(ckpt), reference.prompt_ids(str(ckpt), query, doc), max_new_tokens)


def test_predict_scores_pairs_in_order_as_path_a(reranker, tiny_ckpt):
    pairs = [(QUERY, DOCS[0]), ("Who wrote Hamlet?", "Hamlet is a play by Shakespeare."), (QUERY, DOCS[1])]
    scores, logits = reranker.predict(pairs), reranker.predict(pairs, raw=True)
    for (query, doc), score, logit in zip(pairs, scores, logits):
        ref = _path_a(tiny_ckpt, query, doc)
        assert abs(score - ref["score"]) <= TOL and abs(logit - ref["logit"]) <= 1e-4
    assert reranker.predict([]) == []
    with pytest.raises(ValueError, match=r"pairs\[1\] must be a \(query, document\) pair"):
        reranker.predict([(QUERY, DOCS[0]), (QUERY,)])


def test_rank_puts_the_best_first_and_top_n_cuts_the_list(reranker, tiny_ckpt):
    ranked = reranker.rank(QUERY, DOCS)
    refs = [_path_a(tiny_ckpt, QUERY, d)["score"] for d in DOCS]
    assert [r.index for r in ranked] == best_first(refs)
    for r in ranked:
        assert abs(r.score - refs[r.index]) <= TOL and r.truncated is False and r.chunk is None
        assert r.num_tokens == len(reference.prompt_ids(str(tiny_ckpt), QUERY, DOCS[r.index]))
        assert not r.has_evidence and r.evidence is None
    top = reranker.rank(QUERY, DOCS, top_n=2)
    assert [r.index for r in top] == best_first(refs)[:2]
    with pytest.raises(ValueError, match="top_n must be a positive integer"):
        reranker.rank(QUERY, DOCS, top_n=0)
    with pytest.raises(ValueError, match="query must be a non-empty string"):
        reranker.rank("  ", DOCS)


def test_evidence_for_the_top_documents_is_path_as_greedy_text(reranker, tiny_ckpt):
    ranked = reranker.rank(QUERY, DOCS, evidence={"top_n": 2, "max_new_tokens": 12})
    for rank, r in enumerate(ranked, 1):
        if rank > 2:
            assert not r.has_evidence and r.generated_text is None
            continue
        ref = _path_a(tiny_ckpt, QUERY, DOCS[r.index], max_new_tokens=12)
        assert r.has_evidence and r.generated_text == ref["text"]
    assert sum(r.has_evidence for r in reranker.rank(QUERY, DOCS, evidence=1)) == 1
    with pytest.raises(ValueError, match="top_n"):
        reranker.rank(QUERY, DOCS, evidence={"top_n": 0})


def test_a_chunked_document_is_scored_by_its_best_chunk(reranker, tiny_ckpt):
    long_doc = " ".join(english_texts(4, 80, 160))
    docs = [long_doc, DOCS[0]]
    ranked = {r.index: r for r in reranker.rank(QUERY, docs, chunking={"max_chunks_per_doc": 3, "chunk_tokens": 100})}
    assert ranked[0].chunk["count"] == 3 and ranked[0].truncated
    assert ranked[1].chunk == {"index": 0, "count": 1, "start": 0, "end": len(DOCS[0])}
    for i, doc in enumerate(docs):
        c = ranked[i].chunk
        assert abs(ranked[i].score - _path_a(tiny_ckpt, QUERY, doc[c["start"]:c["end"]])["score"]) <= TOL


def test_async_code_awaits_arank_and_apredict(reranker):
    async def main():
        return await asyncio.gather(reranker.arank(QUERY, DOCS, top_n=1), reranker.apredict([(QUERY, DOCS[0])]))

    (best,), (score,) = asyncio.run(main())
    assert best.index == reranker.rank(QUERY, DOCS)[0].index
    assert score == pytest.approx(reranker.predict([(QUERY, DOCS[0])])[0], abs=1e-6)


def test_the_model_is_loaded_and_run_on_the_rerankers_own_thread(tiny_ckpt, monkeypatch):
    """Loading, `rank`, `predict`, their async forms and the evidence engine all run on one thread of the
    Reranker's: one OpenMP team per process (the module's docstring)."""
    import threading

    import prism_ray.engine.score as score_module
    from prism_ray.engine import EvidenceEngine, ScoreEngine

    seen = []

    def recording(fn):
        return lambda *a, **kw: seen.append(threading.current_thread()) or fn(*a, **kw)

    monkeypatch.setattr(score_module, "load_model", recording(score_module.load_model))
    monkeypatch.setattr(ScoreEngine, "score", recording(ScoreEngine.score))
    monkeypatch.setattr(EvidenceEngine, "generate", recording(EvidenceEngine.generate))
    reranker = Reranker(tiny_ckpt, dtype="float32")
    reranker.rank(QUERY, DOCS[:2], evidence=1)
    reranker.predict([(QUERY, DOCS[0])])

    async def main():
        await asyncio.gather(reranker.arank(QUERY, DOCS[:2]), reranker.apredict([(QUERY, DOCS[1])]))

    asyncio.run(main())
    assert len(seen) == 6 and len(set(seen)) == 1  # load, rank + its evidence, predict, arank, apredict
    assert seen[0] is not threading.main_thread() and seen[0].name.startswith("prism-reranker")
