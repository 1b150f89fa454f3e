"""The Ray Data processor (`prism_ray.data`) on a real local Ray cluster, with the tiny test checkpoint.

Scores are checked against the in-process ScoreEngine and evidence against EvidenceEngine (both
checked against the model card's reference paths in test_score_engine / test_evidence_engine).
"""

from __future__ import annotations

import time

import pytest
from batch_data import groups, long_rows
from conftest import english_texts
from pydantic import ValidationError

from prism_ray.data import PrismProcessorConfig, build_processor
from prism_ray.engine import EvidenceEngine, ScoreEngine
from prism_ray.ranking import best_first, ranks

TOL = 1e-5

pytestmark = pytest.mark.cluster  # starts a Ray cluster


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=4, object_store_memory=128 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return ScoreEngine(tiny_ckpt, dtype="float32")


def _config(tiny_ckpt, **kw) -> dict:
    return {"model": str(tiny_ckpt), "dtype": "float32", **kw}


def _cpus_in_use() -> float:
    """CPUs held by tasks and actors (an actor pool's scorer holds its tier's `num_cpus`)."""
    import ray

    return ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0.0)


def test_wide_rows_keep_their_columns_get_the_engines_scores_and_bad_rows_an_error(cluster, tiny_ckpt, engine):
    import ray

    texts = english_texts(9, 10, 60)
    items = [
        {"query": "How are exceptions handled?", "documents": texts[:4], "tag": "plain"},
        {"query": "What is a generator?", "documents": texts[4:7], "tag": "three"},
        {"query": "What does with do?", "documents": [texts[7], None, texts[8]], "tag": "a null doc"},
        {"query": "   ", "documents": texts[:2], "tag": "empty query"},
        {"query": "Anything?", "documents": None, "tag": "no documents"},
    ]
    ds = ray.data.from_items(items)
    out = {r["tag"]: r for r in build_processor(_config(tiny_ckpt, batch_size=2))(ds).take_all()}
    assert set(out) == {i["tag"] for i in items}
    for item in items[:2]:
        row = out[item["tag"]]
        docs = item["documents"]
        expected = [r.score for r in engine.score_pairs(item["query"], docs)]
        assert len(row["scores"]) == len(docs)
        assert max(abs(a - b) for a, b in zip(row["scores"], expected)) <= TOL
        assert row["ranking"] == best_first(expected) and row["truncated"] == [False] * len(docs)
        assert row["error"] is None and row["query"] == item["query"]
    null_doc = out["a null doc"]
    assert null_doc["scores"][1] is None and null_doc["error"] == "documents[1]: text is null"
    good = [r.score for r in engine.score_pairs("What does with do?", [texts[7], texts[8]])]
    assert abs(null_doc["scores"][0] - good[0]) <= TOL and abs(null_doc["scores"][2] - good[1]) <= TOL
    assert sorted(null_doc["ranking"]) == [0, 2]
    assert out["empty query"]["error"] == "query is empty" and out["empty query"]["scores"] == [None, None]
    assert out["empty query"]["ranking"] == []
    assert out["no documents"]["error"] == "documents is null" and out["no documents"]["scores"] is None


def test_long_rows_ranked_within_their_query_with_evidence_for_the_top_k(cluster, tiny_ckpt, engine):
    import ray

    rows = long_rows(4, 5)
    items = [{"qid": q, "question": t, "doc_id": d, "body": x, "source": f"s-{d}"}
             for q, t, d, x in zip(rows["query_id"], rows["query"], rows["doc_id"], rows["text"])]
    items.append({"qid": "q000", "question": rows["query"][0], "doc_id": "null", "body": None, "source": "s-null"})
    cfg = _config(tiny_ckpt, layout="long", num_groups=3, evidence={"top_k": 1, "max_new_tokens": 6},
                  columns={"query_id": "qid", "query": "question", "text": "body"})
    got = {r["doc_id"]: r for r in build_processor(cfg)(ray.data.from_items(items)).take_all()}
    assert len(got) == len(items)
    assert all(r["source"] == f"s-{d}" for d, r in got.items())  # the input's own columns come through
    bad = got["null"]
    assert bad["error"] == "text is null" and bad["score"] is None and bad["rank"] is None
    assert bad["contribution"] is None
    evidence = EvidenceEngine(engine.loaded)
    for query, dids, texts in groups(rows).values():
        expected = engine.score_pairs(query, texts)
        for e, d in zip(expected, dids):
            assert abs(got[d]["score"] - e.score) <= TOL and abs(got[d]["logit"] - e.logit) <= 10 * TOL
            assert got[d]["error"] is None and got[d]["truncated"] is False
        assert [got[d]["rank"] for d in dids] == ranks([e.score for e in expected])
        top = dids[best_first([e.score for e in expected])[0]]
        made = evidence.generate([(query, got[top]["body"])], max_new_tokens=6)[0]
        assert (got[top]["generation"], got[top]["contribution"], got[top]["evidence"]) == (
            made.text, made.contribution, made.evidence)
        assert all(got[d]["generation"] is None for d in dids if d != top)


def test_the_processor_is_lazy_and_runs_preprocess_and_postprocess_as_maps(cluster, tiny_ckpt, engine, tmp_path):
    import ray

    marker = tmp_path / "preprocess-ran"

    def preprocess(row):
        marker.touch()
        return {"query": row["q"], "documents": row["docs"].split("|")}

    def postprocess(row):
        return {"query": row["query"], "best": row["documents"][row["ranking"][0]]}

    ds = ray.data.from_items([{"q": "What is water?", "docs": "Water is H2O.|Paris is in France.|Water boils."}])
    assert _cpus_in_use() == 0
    ranked = build_processor(_config(tiny_ckpt), preprocess=preprocess, postprocess=postprocess)(ds)
    time.sleep(1.0)  # time for an eager pipeline to show: a task or an actor would hold a CPU
    assert not marker.exists() and _cpus_in_use() == 0  # nothing ran: no map, no actor
    [row] = ranked.take_all()
    assert marker.exists()
    docs = ["Water is H2O.", "Paris is in France.", "Water boils."]
    scores = [r.score for r in engine.score_pairs("What is water?", docs)]
    assert row == {"query": "What is water?", "best": docs[best_first(scores)[0]]}


def test_chunked_wide_rows_of_text_objects_report_each_documents_best_chunk(cluster, tiny_ckpt, engine):
    import ray

    long_doc = " ".join(english_texts(4, 80, 160))
    item = {"query": "What is water?", "documents": [{"text": long_doc}, {"text": "Water boils at 100 C."}]}
    cfg = _config(tiny_ckpt, chunking={"max_chunks_per_doc": 3, "chunk_tokens": 100})
    [row] = build_processor(cfg)(ray.data.from_items([item])).take_all()
    long_chunk, short_chunk = row["chunks"]
    assert long_chunk["count"] == 3 and row["truncated"] == [True, False]
    assert (short_chunk["index"], short_chunk["count"], short_chunk["start"], short_chunk["end"]) == (0, 1, 0, 21)
    for doc, chunk, score in zip(item["documents"], row["chunks"], row["scores"]):
        alone = engine.score_pairs(item["query"], [doc["text"][chunk["start"]:chunk["end"]]])[0].score
        assert abs(score - alone) <= TOL


def test_config_mistakes_name_the_field(cluster, tiny_ckpt):
    import ray

    with pytest.raises(ValidationError, match="batch_size"):
        PrismProcessorConfig.model_validate(_config(tiny_ckpt, batch_size=0))
    with pytest.raises(ValidationError, match="concurrency"):
        PrismProcessorConfig.model_validate(_config(tiny_ckpt, concurrency=[3, 1]))
    with pytest.raises(ValidationError, match="num_actors"):
        PrismProcessorConfig.model_validate(_config(tiny_ckpt, num_actors=2))
    ds = ray.data.from_items([{"question": "What is water?", "documents": ["Water is H2O."]}])
    with pytest.raises(Exception, match=r"wide layout needs a 'query' column \(set columns.query\)"):
        build_processor(_config(tiny_ckpt))(ds).take_all()


def test_wide_rows_get_evidence_for_their_top_k_documents(cluster, tiny_ckpt, engine):
    import ray

    texts = english_texts(6, 10, 40)
    items = [{"query": "How are exceptions handled?", "documents": texts[:4]},
             {"query": "What is a generator?", "documents": texts[4:]}]
    cfg = _config(tiny_ckpt, evidence={"top_k": 1, "max_new_tokens": 5})
    out = {r["query"]: r for r in build_processor(cfg)(ray.data.from_items(items)).take_all()}
    evidence = EvidenceEngine(engine.loaded)
    for item in items:
        row = out[item["query"]]
        best = row["ranking"][0]
        made = evidence.generate([(item["query"], item["documents"][best])], max_new_tokens=5)[0]
        assert row["generations"][best] == made.text and made.text  # the model's own text, not only its tags
        assert (row["contributions"][best], row["evidences"][best]) == (made.contribution, made.evidence)
        others = [i for i in range(len(item["documents"])) if i != best]
        assert all(row["generations"][i] is None and row["contributions"][i] is None for i in others)
        assert len(row["contributions"]) == len(item["documents"]) and row["error"] is None
        assert "_evidence_texts" not in row
