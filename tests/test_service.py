"""The rerank service without Ray: tiers are plain async functions."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from prism_ray.api import CascadeOptions, EvidenceOptions, RerankJob
from prism_ray.config import AppConfig
from prism_ray.errors import ErrorKind, PrismError
from prism_ray.prompt import PrismPromptTokenizer
from prism_ray.results import EvidenceResult, ScoreReply, ScoreResult, Timing
from prism_ray.service import RerankService

QUERY = "What is the boiling point of water?"


@pytest.fixture(scope="module")
def prompts(tiny_ckpt):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    return {"small": PrismPromptTokenizer(tok, max_length=512), "big": PrismPromptTokenizer(tok, max_length=512)}


def _config(**limits):
    return AppConfig.model_validate({
        "models": [{"name": "small", "model": "/m/small", "size": "0.8b"},
                   {"name": "big", "model": "/m/big", "size": "9b", "evidence": None}],
        "limits": {"max_documents": 5, "max_query_chars": 40, "max_new_tokens": 32, "max_evidence_documents": 3,
                   "max_in_flight": 2, **limits}})


class FakeTiers:
    """Scores a document by a per-model table; records every call."""

    def __init__(self, scores: dict[str, dict[str, float]], fail_evidence_for: set[str] = frozenset()):
        self.scores, self.fail = scores, fail_evidence_for
        self.score_calls: list[tuple[str, list[str]]] = []
        self.evidence_calls: list[tuple[str, str, int]] = []

    async def score(self, model, query, documents, max_doc_tokens):
        self.score_calls.append((model, list(documents)))
        await asyncio.sleep(0)
        return ScoreReply([ScoreResult(self.scores[model][d], 0.0, 10, d.startswith("long")) for d in documents],
                          Timing(compute_ms=1.0))

    async def evidence(self, model, query, document, max_new_tokens):
        self.evidence_calls.append((model, document, max_new_tokens))
        await asyncio.sleep(0.01 * len(document))  # longer documents finish later
        if document in self.fail:
            raise RuntimeError("replica died")
        return _evidence(f"c:{document}", f"e:{document}", document)


def _evidence(contribution: str, evidence: str, text: str) -> EvidenceResult:
    return EvidenceResult(score=0.9, logit=2.2, relevant=True, contribution=contribution, evidence=evidence, text=text,
                          truncated=False, num_tokens=10, prompt_truncated=False, generated_tokens=len(text))


def _job(docs, **kw):
    return RerankJob(shape=kw.pop("shape", "cohere"), model=kw.pop("model", None), query=kw.pop("query", QUERY),
                     documents=list(docs), documents_field="documents", **kw)


def _service(prompts, tiers, **limits):
    return RerankService(_config(**limits), prompts, score=tiers.score, evidence=tiers.evidence)


SCORES = {"small": {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.7, "long": 0.3},
          "big": {"a": 0.2, "b": 0.3, "c": 0.8, "d": 0.6, "long": 0.1}}


def run(coro):
    return asyncio.run(coro)


def test_ranks_best_first_and_renders_the_shape(prompts):
    tiers = FakeTiers(SCORES)
    svc = _service(prompts, tiers)
    job = _job("abcd", top_n=3)
    prepared = svc.prepare(job)
    body, ranked = run(svc.respond(job, prepared))
    assert prepared.model.name == "small" and job.model is None  # what prepare decided; the job is unchanged
    assert [r.index for r in ranked] == [1, 3, 2, 0]
    assert [r["index"] for r in body["results"]] == [1, 3, 2]
    assert body["meta"]["tokens"]["input_tokens"] == 40


def test_model_by_size_any_case_and_unknown(prompts):
    svc = _service(prompts, FakeTiers(SCORES))
    assert svc.prepare(_job("a", model="9B")).model.name == "big"
    with pytest.raises(PrismError) as err:
        svc.prepare(_job("a", model="13b"))
    assert err.value.kind is ErrorKind.UNKNOWN_MODEL and err.value.status == 404 and err.value.param == "model"
    assert "small (0.8b)" in err.value.message


def test_cascade_rescored_top_leads_the_rest_keep_screen_order(prompts):
    tiers = FakeTiers(SCORES)
    svc = _service(prompts, tiers)
    job = _job("abcd", model="big", cascade=CascadeOptions(screen="0.8b", rescore_top=2))
    _, ranked = run(svc.respond(job, svc.prepare(job)))
    # the screen (small) ranks b, d, c, a; big rescores b, d -> d (0.6) before b (0.3)
    assert [(r.index, r.model) for r in ranked] == [(3, "big"), (1, "big"), (2, "small"), (0, "small")]
    assert tiers.score_calls == [("small", list("abcd")), ("big", ["b", "d"])]


@pytest.mark.parametrize("job,kind,param,needle", [
    (_job("a" * 6), ErrorKind.TOO_LARGE, "documents", "max_documents"),
    (_job([]), ErrorKind.BAD_REQUEST, "documents", "at least one"),
    (_job("a", query="q" * 41), ErrorKind.BAD_REQUEST, "query", "max_query_chars"),
    (_job("a", evidence=EvidenceOptions(top_n=4)), ErrorKind.BAD_REQUEST, "evidence.top_n", "max_evidence_documents"),
    (_job("a", evidence=EvidenceOptions(max_new_tokens=33)), ErrorKind.BAD_REQUEST, "evidence.max_new_tokens",
     "max_new_tokens"),
    (_job("a", model="big", evidence=EvidenceOptions()), ErrorKind.BAD_REQUEST, "evidence", "no evidence tier"),
    (_job("a", cascade=CascadeOptions(screen="1b")), ErrorKind.UNKNOWN_MODEL, "cascade.screen", "not found"),
])
def test_limits_name_the_field_and_the_limit(prompts, job, kind, param, needle):
    tiers = FakeTiers(SCORES)
    with pytest.raises(PrismError) as err:
        _service(prompts, tiers).prepare(job)
    assert (err.value.kind, err.value.param) == (kind, param) and needle in err.value.message
    assert err.value.body() == {"message": err.value.message, "type": kind.value, "param": param}
    assert tiers.score_calls == []


def test_a_query_that_leaves_no_room_under_max_length(prompts):
    svc = _service(prompts, FakeTiers(SCORES), max_query_chars=5000)
    with pytest.raises(PrismError, match="max_length=512") as err:
        svc.prepare(_job("a", query="word " * 400))
    assert err.value.status == 422


def test_truncate_false_refuses_a_cut_document(prompts):
    svc = _service(prompts, FakeTiers(SCORES))
    job = _job(["a", "long"], truncate=False, shape="jina")
    with pytest.raises(PrismError) as err:
        run(svc.respond(job, svc.prepare(job)))
    assert err.value.status == 413 and err.value.param == "documents.1"


def test_evidence_targets_top_n_and_min_score(prompts):
    tiers = FakeTiers(SCORES)
    svc = _service(prompts, tiers)
    job = _job("abcd", evidence=EvidenceOptions(top_n=3, min_score=0.6, max_new_tokens=7))
    body, _ = run(svc.respond(job, svc.prepare(job)))
    assert sorted(d for _, d, _ in tiers.evidence_calls) == ["b", "d"]  # c (0.5) is in the top 3 but under 0.6
    assert {n for _, _, n in tiers.evidence_calls} == {7}
    by_index = {r["index"]: r for r in body["results"]}
    assert by_index[1]["evidence"] == "e:b" and "evidence" not in by_index[2]


def test_stream_scores_then_evidence_as_it_finishes_then_done(prompts):
    tiers = FakeTiers({**SCORES, "small": {"a": 0.1, "bbbb": 0.9, "cc": 0.5}})
    svc = _service(prompts, tiers)
    job = _job(["a", "bbbb", "cc"], evidence=EvidenceOptions(top_n=2), stream=True)
    model = svc.prepare(job)

    async def collect():
        return [e async for e in svc.events(job, model)]

    events = run(collect())
    assert [e for e, _ in events] == ["scores", "evidence", "evidence", "done"]
    assert [r["index"] for r in events[0][1]["results"]] == [1, 2, 0]
    assert all("evidence" not in r for r in events[0][1]["results"])
    assert [d["index"] for _, d in events[1:3]] == [2, 1]  # "cc" finishes before "bbbb"
    assert events[-1][1] == {"evidence_documents": 2, "failed": 0}


def test_stream_passes_the_text_as_it_is_written_then_each_evidence_then_done(prompts):
    """With a streaming evidence tier: `evidence_delta` events (index, new text) for each target, interleaved
    as the tiers write, and for each index the deltas come before its `evidence` event and make its text."""
    tiers = FakeTiers({**SCORES, "small": {"a": 0.1, "bbbb": 0.9, "cc": 0.5}})

    async def stream(model, query, document, max_new_tokens):
        for ch in document:  # one piece per character, with a pause: the two targets interleave
            await asyncio.sleep(0.01)
            yield ch
        yield await tiers.evidence(model, query, document, max_new_tokens)

    svc = RerankService(_config(), prompts, score=tiers.score, evidence=tiers.evidence, evidence_stream=stream)
    job = _job(["a", "bbbb", "cc"], evidence=EvidenceOptions(top_n=2), stream=True)
    model = svc.prepare(job)

    async def collect():
        return [e async for e in svc.events(job, model)]

    events = run(collect())
    kinds = [e for e, _ in events]
    assert kinds[0] == "scores" and kinds[-1] == "done" and kinds.count("evidence") == 2
    assert events[-1][1] == {"evidence_documents": 2, "failed": 0}
    for index, doc in ((1, "bbbb"), (2, "cc")):
        deltas = [d["text"] for e, d in events if e == "evidence_delta" and d["index"] == index]
        final = next(i for i, (e, d) in enumerate(events) if e == "evidence" and d["index"] == index)
        assert "".join(deltas) == doc == events[final][1]["generated_text"]
        assert all(i < final for i, (e, d) in enumerate(events) if e == "evidence_delta" and d["index"] == index)
    firsts = [d["index"] for e, d in events if e == "evidence_delta"][:2]
    assert sorted(firsts) == [1, 2]  # both targets write at once, not one after the other


def test_stream_a_failing_evidence_is_an_error_event_and_the_stream_still_ends(prompts):
    tiers = FakeTiers(SCORES, fail_evidence_for={"b"})
    svc = _service(prompts, tiers)
    job = _job("abcd", evidence=EvidenceOptions(top_n=2), stream=True)
    model = svc.prepare(job)

    async def collect():
        return [e async for e in svc.events(job, model)]

    events = run(collect())
    kinds = [e for e, _ in events]
    assert kinds[0] == "scores" and sorted(kinds[1:3]) == ["error", "evidence"] and kinds[3] == "done"
    error = next(d for e, d in events if e == "error")
    assert error["index"] == 1 and error["type"] == "internal"
    assert events[-1][1] == {"evidence_documents": 1, "failed": 1}


def test_a_scorer_that_raises_fails_the_request(prompts):
    async def broken(*args):
        raise PrismError(ErrorKind.SATURATED, "saturated", headers={"Retry-After": "1"})

    svc = RerankService(_config(), prompts, score=broken, evidence=FakeTiers(SCORES).evidence)
    job = _job("ab")
    with pytest.raises(PrismError) as err:
        run(svc.respond(job, svc.prepare(job)))
    assert err.value.status == 503 and err.value.headers == {"Retry-After": "1"}


def test_a_scorer_returning_the_wrong_count_is_an_internal_error(prompts):
    async def short(model, query, documents, max_doc_tokens):
        return ScoreReply([], Timing(compute_ms=0.0))

    svc = RerankService(_config(), prompts, score=short, evidence=FakeTiers(SCORES).evidence)
    job = _job("ab")
    with pytest.raises(PrismError, match="0 results for 2 documents"):
        run(svc.respond(job, svc.prepare(job)))


def test_admission_holds_max_in_flight_slots(prompts):
    svc = _service(prompts, FakeTiers(SCORES))
    with svc.admission(), svc.admission():
        with pytest.raises(PrismError) as err, svc.admission():
            pass
        assert err.value.status == 429 and err.value.headers == {"Retry-After": "1"}
    assert svc.in_flight == 0
    with svc.admission():
        assert svc.in_flight == 1


def test_stream_past_its_deadline_ends_unfinished_evidence_with_timeout_events(prompts):
    """Evidence still running at the deadline is cancelled; each gets a `timeout` error event; `done` follows."""
    tiers = FakeTiers({**SCORES, "small": {"a": 0.9, "b" * 300: 0.8, "c": 0.1}})
    svc = _service(prompts, tiers)
    job = _job(["a", "b" * 300, "c"], evidence=EvidenceOptions(top_n=2), stream=True)
    model = svc.prepare(job)

    async def collect():
        loop = asyncio.get_running_loop()
        started = loop.time()
        events = [e async for e in svc.events(job, model, deadline=loop.time() + 0.5)]  # "b"*300 takes 3 s
        return events, loop.time() - started

    events, took = run(collect())
    assert [e for e, _ in events] == ["scores", "evidence", "error", "done"]
    assert events[1][1]["index"] == 0
    assert events[2][1]["index"] == 1 and events[2][1]["type"] == "timeout"
    assert "request_timeout_s" in events[2][1]["message"]
    assert events[-1][1] == {"evidence_documents": 1, "failed": 1}
    assert took < 2.0  # the slow generation was cancelled, not waited for


def _score_job(body):
    from prism_ray.api import ScoreRequest, job_from_score

    return job_from_score(ScoreRequest.model_validate(body))


def test_score_api_one_to_n_and_pairwise_in_input_order(prompts):
    calls = []

    async def groups(model, batch):
        calls.append(batch)
        return [ScoreReply([ScoreResult(SCORES[model][d], ord(d[0]) / 100, 7, False) for d in docs], Timing(0.0))
                for _, docs, _ in batch]

    svc = RerankService(_config(), prompts, score=None, evidence=None, score_groups=groups)
    job = _score_job({"queries": QUERY, "documents": ["a", "b", "c"]})
    body = run(svc.score_pairs(job, svc.prepare_score(job)))
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert [d["score"] for d in body["data"]] == [0.1, 0.9, 0.5] and body["usage"]["prompt_tokens"] == 21
    assert body["object"] == "list" and body["model"] == "small" and body["id"].startswith("score-")
    job = _score_job({"text_1": ["q one", "q two", "q one"], "text_2": ["a", "b", "c"], "use_activation": False})
    body = run(svc.score_pairs(job, svc.prepare_score(job)))
    assert [d["score"] for d in body["data"]] == [0.97, 0.98, 0.99]  # logits, input order
    assert len(calls) == 2 and [(q, docs) for q, docs, _ in calls[1]] == [("q one", ["a", "c"]), ("q two", ["b"])]


@pytest.mark.parametrize("body, needle", [
    ({"queries": ["a", "b"], "documents": ["x", "y", "z"]}, "queries has 2 items and documents 3"),
    ({"queries": "q", "text_1": "q", "documents": ["x"]}, "exactly one of queries and text_1"),
    ({"queries": "q"}, "exactly one of documents and text_2"),
    ({"queries": "q", "documents": []}, "documents: at least one item"),
    ({"queries": " ", "documents": ["x"]}, "pattern"),
])
def test_score_api_bad_shapes_name_the_field(body, needle):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=needle):
        _score_job(body)


def test_score_api_truncate_prompt_tokens_leaves_the_document_its_room(prompts):
    svc = RerankService(_config(), prompts, score=None, evidence=None)
    job = _score_job({"queries": QUERY, "documents": ["a"], "truncate_prompt_tokens": 10_000})
    [room] = svc.prepare_score(job).rooms
    prefix = prompts["small"].prefix(QUERY)
    assert room == 10_000 - len(prefix) - len(prompts["small"].suffix)
    [room] = svc.prepare_score(_score_job({"queries": QUERY, "documents": ["a"], "truncate_prompt_tokens": 1})).rooms
    assert room == 1  # the instruction and query are never cut: the document keeps one token
    with pytest.raises(PrismError) as err:
        svc.prepare_score(_score_job({"queries": QUERY, "documents": ["d"] * 6}))
    assert err.value.kind == ErrorKind.TOO_LARGE and "max_documents" in err.value.message


def test_a_long_document_reaches_the_tiers_cut_to_what_they_read(prompts):
    """A document far longer than max_length is sent to the scorer and the evidence tier as the cut that
    holds every token they read (and a margin): the same tokens, the same `truncated`, a fraction of the bytes."""
    from conftest import english_texts

    long_doc = " ".join(english_texts(40, 200, 200)) * 8
    sent: list[tuple[str, str, int | None]] = []

    async def score(model, query, documents, max_doc_tokens):
        sent.extend(("score", d, max_doc_tokens) for d in documents)
        return ScoreReply([ScoreResult(0.9, 0.0, 10, False) for _ in documents], Timing(0.0))

    async def evidence(model, query, document, max_new_tokens):
        sent.append(("evidence", document, None))
        return _evidence("c", "e", "yes")

    svc = RerankService(_config(), prompts, score=score, evidence=evidence)
    for cap in (None, 50):
        sent.clear()
        job = _job([long_doc, "short"], max_tokens_per_doc=cap, evidence=EvidenceOptions(top_n=2))
        run(svc.respond(job, svc.prepare(job)))
        p = prompts["small"]
        whole = p.encode_text(" " + long_doc)
        for tier, text, max_doc_tokens in sent:
            if text == "short":
                continue
            assert long_doc.startswith(text) and len(text) < len(long_doc) / 20, tier
            assert max_doc_tokens == (cap if tier == "score" else None)
            room = p.document_room(p.prefix(QUERY), max_doc_tokens)
            assert p.encode(QUERY, text, max_doc_tokens=max_doc_tokens) == p.encode(QUERY, long_doc, max_doc_tokens=max_doc_tokens)
            assert p.encode_text(" " + text)[: room + 1] == whole[: room + 1]
        assert sorted(t for t, d, _ in sent if d != "short") == ["evidence", "score"]
