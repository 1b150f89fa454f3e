"""The Serve application on a real local Ray cluster, over HTTP on 127.0.0.1.

One cluster and two applications for the whole module: `prism` (two models, both tiers) and
`guarded` (API keys, tight limits) under /guarded; Serve's proxy runs the body guard with each one's limits,
as `prism-ray serve` starts it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import pytest
from conftest import english_texts, environment, free_port, guarded_proxy, serve_tier

from prism_ray.engine import EvidenceEngine, ScoreEngine

QUERY = "What is the boiling point of water at sea level?"
TOL = 1e-5

pytestmark = pytest.mark.cluster  # starts a Ray cluster




@pytest.fixture(scope="module")
def server(tiny_ckpt, qwen3_ckpt):
    import ray
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    main = {
        "default_model": "prism-tiny",
        "models": [
            {"name": "prism-tiny", "model": str(tiny_ckpt), "size": "0.8b", "dtype": "float32", "max_length": 512,
             "scorer": serve_tier(max_batch_tokens=1024), "evidence": serve_tier(max_active_pairs=8)},
            {"name": "prism-qwen3", "model": str(qwen3_ckpt), "size": "4b-exp", "dtype": "float32",
             "scorer": serve_tier(), "evidence": None},
        ],
        "limits": {"max_documents": 40, "max_query_chars": 64, "max_body_bytes": 65536, "max_new_tokens": 64},
    }
    guarded = {
        "models": [{"name": "prism-tiny", "model": str(tiny_ckpt), "dtype": "float32", "scorer": serve_tier(),
                    "evidence": None}],
        "api_keys": ["secret-key"],
        "limits": {"max_in_flight": 1, "body_timeout_s": 1.5},
    }
    with environment(guarded_proxy({"/": main["limits"], "/guarded": guarded["limits"]})):  # the proxy as `prism-ray serve` starts it
        ray.init(num_cpus=8, object_store_memory=128 * 1024**2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(main), name="prism", route_prefix="/")
    serve.run(build_app(guarded), name="guarded", route_prefix="/guarded")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tiny_engine(tiny_ckpt):
    from prism_ray.engine import load_model

    return ScoreEngine(load_model(tiny_ckpt, dtype="float32", max_length=512))


@pytest.fixture(scope="module")
def qwen3_engine(qwen3_ckpt):
    return ScoreEngine(qwen3_ckpt, dtype="float32")


DOCS = english_texts(6, 5, 80)


def test_cohere_sdk(server, tiny_engine):
    import cohere

    co = cohere.ClientV2(api_key="unused", base_url=server)
    resp = co.rerank(model="prism-tiny", query=QUERY, documents=DOCS, top_n=4)
    expected = tiny_engine.score_pairs(QUERY, DOCS)
    assert len(resp.results) == 4
    scores = [r.relevance_score for r in resp.results]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(max(r.score for r in expected), abs=TOL)
    for r in resp.results:
        assert abs(r.relevance_score - expected[r.index].score) <= TOL
    assert resp.meta.tokens.input_tokens == sum(r.num_tokens for r in expected)


def test_cohere_max_tokens_per_doc(client, tiny_engine):
    out = client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS[:3], "max_tokens_per_doc": 4}).json()
    expected = tiny_engine.score([(QUERY, DOCS[:3])], max_doc_tokens=4)[0]
    assert out["meta"]["tokens"]["input_tokens"] == sum(r.num_tokens for r in expected)
    for r in out["results"]:
        assert abs(r["relevance_score"] - expected[r["index"]].score) <= TOL


def test_jina_shape(client, tiny_engine):
    body = {"model": "prism-tiny", "query": QUERY, "documents": [DOCS[0], {"text": DOCS[1]}], "top_n": 5}
    for path in ("/v1/rerank", "/rerank"):
        out = client.post(path, json=body).json()
        expected = tiny_engine.score_pairs(QUERY, DOCS[:2])
        assert out["model"] == "prism-tiny"
        assert out["usage"]["total_tokens"] == sum(r.num_tokens for r in expected)
        assert len(out["results"]) == 2
        for r in out["results"]:
            assert abs(r["relevance_score"] - expected[r["index"]].score) <= TOL
            assert r["document"]["text"] == DOCS[r["index"]]


def test_tei_shape(client, tiny_engine):
    out = client.post("/rerank", json={"query": QUERY, "texts": DOCS[:3], "raw_scores": True, "return_text": True})
    assert out.status_code == 200
    expected = tiny_engine.score_pairs(QUERY, DOCS[:3])
    for r in out.json():
        assert abs(r["score"] - expected[r["index"]].logit) <= 1e-4
        assert r["text"] == DOCS[r["index"]]
    plain = client.post("/rerank", json={"query": QUERY, "texts": DOCS[:3]}).json()
    assert all("text" not in r and 0 < r["score"] < 1 for r in plain)


def test_server_timing_reports_the_scorer_engine_time(client):
    t0 = time.perf_counter()
    resp = client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS})
    elapsed_ms = 1000 * (time.perf_counter() - t0)
    timings = dict(entry.strip().split(";dur=") for entry in resp.headers["server-timing"].split(","))
    assert list(timings) == ["scorer", "router"] and 0 < float(timings["scorer"]) < elapsed_ms
    assert 0 < float(timings["router"]) < elapsed_ms - float(timings["scorer"])  # its own time, apart from the tier's


def test_tei_truncate_false_refuses_long_documents(client):
    long_doc = " ".join(english_texts(4, 200, 200))
    refused = client.post("/rerank", json={"query": QUERY, "texts": ["short", long_doc], "truncate": False})
    assert refused.status_code == 413 and "texts.1" in refused.json()["message"]
    assert client.post("/rerank", json={"query": QUERY, "texts": ["short", long_doc]}).status_code == 200


def test_evidence_extension_equals_evidence_engine(client, tiny_ckpt):
    body = {"query": QUERY, "documents": DOCS, "evidence": {"top_n": 2, "max_new_tokens": 12}}
    out = client.post("/v2/rerank", json=body).json()
    with_ev = [r for r in out["results"] if "generated_text" in r]
    assert [r["index"] for r in with_ev] == [r["index"] for r in out["results"][:2]]
    engine = EvidenceEngine(tiny_ckpt, dtype="float32")
    ref = engine.generate([(QUERY, DOCS[r["index"]]) for r in with_ev], max_new_tokens=12)
    for r, e in zip(with_ev, ref):
        assert r["generated_text"] == e.text
        assert (r["contribution"], r["evidence"], r["evidence_truncated"]) == (e.contribution, e.evidence, e.truncated)
    min_score = client.post("/v2/rerank", json={**body, "evidence": {"top_n": 6, "min_score": 0.999, "max_new_tokens": 4}})
    assert all("generated_text" not in r for r in min_score.json()["results"] if r["relevance_score"] < 0.999)


def test_routing_by_name_size_default_and_unknown(client, tiny_engine, qwen3_engine):
    q3 = qwen3_engine.score_pairs(QUERY, DOCS[:2])
    t = tiny_engine.score_pairs(QUERY, DOCS[:2])
    for model, expected in (("prism-qwen3", q3), ("4b-exp", q3), ("4B-EXP", q3), ("0.8b", t), (None, t)):
        body = {"query": QUERY, "documents": DOCS[:2], **({"model": model} if model else {})}
        for r in client.post("/v2/rerank", json=body).json()["results"]:
            assert abs(r["relevance_score"] - expected[r["index"]].score) <= TOL, model
    missing = client.post("/v2/rerank", json={"model": "13b", "query": QUERY, "documents": ["a"]})
    assert missing.status_code == 404
    assert "prism-tiny (0.8b)" in missing.json()["message"] and "prism-qwen3 (4b-exp)" in missing.json()["message"]


def test_cascade(client, tiny_engine, qwen3_engine):
    body = {"model": "4b-exp", "query": QUERY, "documents": DOCS, "cascade": {"screen": "0.8b", "rescore_top": 2}}
    out = client.post("/v1/rerank", json=body).json()["results"]
    screen = tiny_engine.score_pairs(QUERY, DOCS)
    top2 = sorted(range(len(DOCS)), key=lambda i: -screen[i].score)[:2]
    rescored = qwen3_engine.score_pairs(QUERY, [DOCS[i] for i in top2])
    assert {r["index"] for r in out[:2]} == set(top2)
    for r in out[:2]:
        assert r["model"] == "prism-qwen3"
        assert abs(r["relevance_score"] - rescored[top2.index(r["index"])].score) <= TOL
    for r in out[2:]:
        assert r["model"] == "prism-tiny" and abs(r["relevance_score"] - screen[r["index"]].score) <= TOL


def test_streaming_scores_first_then_evidence(server):
    body = {"query": QUERY, "documents": DOCS[:4], "stream": True, "evidence": {"top_n": 3, "max_new_tokens": 24}}
    events, arrived = [], []
    with httpx.stream("POST", f"{server}/v1/rerank", json=body, timeout=120) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
                arrived.append(time.monotonic())
    kinds = [e for e, _ in events]
    finished = [d for e, d in events if e == "evidence"]
    assert kinds[0] == "scores" and kinds[-1] == "done" and set(kinds[1:-1]) == {"evidence_delta", "evidence"}
    scores = events[0][1]["results"]
    assert len(scores) == 4 and all("generated_text" not in r for r in scores)
    assert len(finished) == 3 and {d["index"] for d in finished} == {r["index"] for r in scores[:3]}
    assert arrived[0] < arrived[-2]  # the scores were in the client's hands before the last evidence
    for d in finished:  # each text arrived in pieces, before its evidence event, and they make it
        pieces = [(i, p["text"]) for i, (e, p) in enumerate(events) if e == "evidence_delta" and p["index"] == d["index"]]
        assert len(pieces) >= 2 and "".join(t for _, t in pieces) == d["generated_text"]
        assert pieces[-1][0] < events.index(("evidence", d))


def test_concurrent_requests_equal_one_at_a_time(server, client):
    bodies = [{"query": f"{QUERY} #{i % 5}", "documents": english_texts(1 + i % 9, 5, 60)} for i in range(50)]

    async def fire():
        async with httpx.AsyncClient(base_url=server, timeout=300) as ac:
            return await asyncio.gather(*(ac.post("/v2/rerank", json=b) for b in bodies))

    concurrent = asyncio.run(fire())
    assert all(r.status_code == 200 for r in concurrent)
    for body, resp in list(zip(bodies, concurrent))[:12]:  # spot-check against serial calls
        serial = {r["index"]: r["relevance_score"] for r in client.post("/v2/rerank", json=body).json()["results"]}
        for r in resp.json()["results"]:
            assert abs(r["relevance_score"] - serial[r["index"]]) <= TOL


def test_requests_of_one_query_batched_together_each_get_their_own_scores(server, tiny_engine):
    """Concurrent requests with the same query share one engine call in the scorer; each must get back
    exactly its own documents' scores."""
    docs = english_texts(24, 3, 12)
    bodies = [{"query": QUERY, "documents": docs[i:i + 1 + i % 3]} for i in range(16)]

    async def fire():
        async with httpx.AsyncClient(base_url=server, timeout=300) as ac:
            return await asyncio.gather(*(ac.post("/v2/rerank", json=b) for b in bodies))

    for body, resp in zip(bodies, asyncio.run(fire())):
        expected = tiny_engine.score_pairs(QUERY, body["documents"])
        results = resp.json()["results"]
        assert sorted(r["index"] for r in results) == list(range(len(body["documents"])))
        for r in results:
            assert abs(r["relevance_score"] - expected[r["index"]].score) <= TOL


@pytest.mark.parametrize("path,body,status,needle", [
    ("/v2/rerank", {"query": QUERY, "documents": ["ok", 5]}, 422, "documents.1"),
    ("/v2/rerank", {"query": "  ", "documents": ["ok"]}, 422, "query"),
    ("/v2/rerank", {"query": QUERY, "documents": []}, 422, "documents"),
    ("/v2/rerank", {"documents": ["ok"]}, 422, "query"),
    ("/v2/rerank", {"query": QUERY, "documents": ["d"] * 41}, 413, "max_documents"),
    ("/v2/rerank", {"query": "word " * 100, "documents": ["d"]}, 422, "max_query_chars"),
    ("/v2/rerank", {"query": QUERY, "documents": ["d"], "top_n": 0}, 422, "top_n"),
    ("/v2/rerank", {"query": QUERY, "documents": ["d"], "evidence": {"max_new_tokens": 999}}, 422, "max_new_tokens"),
    ("/v2/rerank", {"query": QUERY, "documents": ["d"], "evidence": {"top_nn": 1}}, 422, "evidence.top_nn"),
    ("/v2/rerank", {"model": "4b-exp", "query": QUERY, "documents": ["d"], "evidence": {}}, 422, "no evidence tier"),
    ("/rerank", {"query": QUERY, "texts": "not a list"}, 422, "texts"),
    ("/rerank", [1, 2], 422, "JSON object"),
])
def test_bad_input_is_4xx_naming_the_field(client, path, body, status, needle):
    resp = client.post(path, json=body)
    assert resp.status_code == status, resp.text
    assert needle in resp.json()["message"]


def test_bad_json_and_huge_body(client):
    bad = client.post("/v2/rerank", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 422
    huge = client.post("/v2/rerank", json={"query": QUERY, "documents": ["x" * 70000]})
    assert huge.status_code == 413 and "max_body_bytes" in huge.json()["message"]
    assert client.post("/rerank", content=b"[", headers={"content-type": "application/json"}).status_code == 422
    # Chunked framing (no Content-Length): refused once its bytes pass the limit, not read to the end.
    def chunks():
        for _ in range(64):  # 64 x 16 KiB = 1 MiB, against a limit of 64 KiB
            yield b"[" * 16384

    chunked = client.post("/v2/rerank", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and "max_body_bytes" in chunked.json()["message"]
    nested = client.post("/v2/rerank", content=b'{"query": "q", "documents": ' + b"[" * 30000 + b"]" * 30000 + b"}",
                         headers={"content-type": "application/json"})
    assert nested.status_code == 422 and "nested more than 32 levels" in nested.json()["message"]
    out_of_range = client.post("/v2/rerank", content=b'{"query": "q", "documents": ["a"], "top_n": 1e999}',
                               headers={"content-type": "application/json"})
    assert out_of_range.status_code == 422 and "out of range" in out_of_range.json()["message"]
    # `curl -d` sends a form content type; the JSON body is still read.
    form = client.post("/v2/rerank", content=json.dumps({"query": QUERY, "documents": ["a"]}).encode(),
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 200 and len(form.json()["results"]) == 1


def test_a_trickled_body_holds_no_slot_and_is_408(server):
    """A client trickling its body (chunked, a byte every 0.1 s) takes no `max_in_flight` slot while it
    sends, so the guarded app (max_in_flight 1) serves another request meanwhile; at body_timeout_s the
    trickle is answered 408."""
    import socket
    import time
    from urllib.parse import urlparse

    url = urlparse(server)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    sock.sendall(b"POST /guarded/v2/rerank HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret-key\r\n"
                 b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    started = time.monotonic()
    ok = None
    try:
        while time.monotonic() - started < 3:
            sock.sendall(b"1\r\n \r\n")
            time.sleep(0.1)
            if ok is None and time.monotonic() - started > 0.5:
                ok = httpx.post(f"{server}/guarded/v2/rerank", json={"query": QUERY, "documents": ["a", "b"]},
                                headers={"Authorization": "Bearer secret-key"}, timeout=30)
    except OSError:
        pass  # the server may close the connection once it has answered
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        piece = sock.recv(65536)
        if not piece:
            break
        answer += piece
    sock.close()
    assert ok is not None and ok.status_code == 200
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body_timeout_s=1.5" in answer


def test_models_health_docs(client):
    models = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["size"], m["backbone"]) for m in models] == [
        ("prism-tiny", "0.8b", "Qwen3.5"), ("prism-qwen3", "4b-exp", "Qwen3")]
    assert models[0]["tiers"]["scorer"]["replicas"] == 1 and models[0]["tiers"]["evidence"]["replicas"] == 1
    assert "evidence" not in models[1]["tiers"]
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/v2/rerank" in spec["paths"]
    assert {"CohereRerankRequest", "JinaRerankRequest", "TeiRerankRequest", "TextObject"} <= set(spec["components"]["schemas"])


def test_auth(client):
    body = {"query": QUERY, "documents": ["a", "b"]}
    assert client.post("/guarded/v2/rerank", json=body).status_code == 401
    wrong = client.post("/guarded/v2/rerank", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "Bearer" in wrong.json()["message"]
    ok = client.post("/guarded/v2/rerank", json=body, headers={"Authorization": "Bearer secret-key"})
    assert ok.status_code == 200
    assert client.get("/guarded/health").status_code == 200
    assert client.post("/v2/rerank", json=body).status_code == 200  # the other app has no keys


def test_overload_is_429_with_retry_after(server):
    headers = {"Authorization": "Bearer secret-key"}
    body = {"query": QUERY, "documents": english_texts(30, 40, 80)}

    async def fire():
        async with httpx.AsyncClient(base_url=server, timeout=300, headers=headers) as ac:
            return await asyncio.gather(*(ac.post("/guarded/v2/rerank", json=body) for _ in range(8)))

    codes = [r.status_code for r in asyncio.run(fire())]
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes
    rejected = next(r for r in asyncio.run(fire()) if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1" and "max_in_flight" in rejected.json()["message"]


def _running(app: str, deployment: str) -> int:
    from ray import serve

    dep = serve.status().applications[app].deployments[deployment]
    return sum(n for state, n in dep.replica_states.items() if str(state).endswith("RUNNING"))


def test_autoscaling_up_under_load_and_back_down(server, tiny_ckpt):
    from ray import serve

    from deployments.app import build_app

    scorer = serve_tier(max_batch_tokens=512)
    del scorer["num_replicas"]
    scorer["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                    "upscale_delay_s": 0.5, "downscale_delay_s": 3, "metrics_interval_s": 0.5,
                                    "look_back_period_s": 2}
    config = {"models": [{"name": "prism-tiny", "model": str(tiny_ckpt), "dtype": "float32", "scorer": scorer,
                          "evidence": None}]}
    serve.run(build_app(config), name="scaling", route_prefix="/scaling")
    assert _running("scaling", "prism-tiny-scorer") == 1
    body = {"query": QUERY, "documents": english_texts(20, 40, 80)}

    async def load(deadline: float) -> int:
        async with httpx.AsyncClient(base_url=server, timeout=120) as ac:
            async def worker():
                sent = 0
                while time.monotonic() < deadline and _running("scaling", "prism-tiny-scorer") < 2:
                    assert (await ac.post("/scaling/v2/rerank", json=body)).status_code == 200
                    sent += 1
                return sent
            return sum(await asyncio.gather(*(worker() for _ in range(6))))

    try:
        sent = asyncio.run(load(time.monotonic() + 90))
        assert sent > 0 and _running("scaling", "prism-tiny-scorer") == 2
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and _running("scaling", "prism-tiny-scorer") > 1:
            time.sleep(1)
        assert _running("scaling", "prism-tiny-scorer") == 1
    finally:
        serve.delete("scaling")


def test_prometheus_metrics_per_model_andserve_tier(client):
    import ray

    client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS[:3], "evidence": {"top_n": 1, "max_new_tokens": 2}})
    client.post("/v2/rerank", json={"model": "13b", "query": QUERY, "documents": ["a"]})
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = ["prism_pairs_scored_total", "prism_tokens_total", "prism_batch_pairs", "prism_queue_wait_seconds",
              "prism_evidence_generated_total", "prism_requests_total", "prism_errors_total"]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    assert 'model="prism-tiny"' in text and 'tier="evidence"' in text and 'kind="unknown_model"' in text


def test_saturated_tier_is_503_with_retry_after(server, tiny_ckpt):
    from ray import serve

    from deployments.app import build_app

    scorer = serve_tier(max_ongoing_requests=1, max_queued_requests=1)
    config = {"models": [{"name": "prism-tiny", "model": str(tiny_ckpt), "dtype": "float32", "scorer": scorer,
                          "evidence": None}]}
    serve.run(build_app(config), name="saturated", route_prefix="/saturated")
    body = {"query": QUERY, "documents": english_texts(30, 40, 80)}

    async def fire():
        async with httpx.AsyncClient(base_url=server, timeout=300) as ac:
            return await asyncio.gather(*(ac.post("/saturated/v2/rerank", json=body) for _ in range(8)))

    try:
        responses = asyncio.run(fire())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.headers["retry-after"] == "1" and "saturated" in rejected.json()["message"]
    finally:
        serve.delete("saturated")


@pytest.fixture(scope="module")
def decode_app(server, tiny_ckpt):
    """An app whose one evidence replica has 3 slots and room for 1 more pair; Serve may send it 8 requests
    (and hold 16 more), so the replica's own scheduler is what refuses."""
    from ray import serve

    from deployments.app import build_app

    evidence = serve_tier(max_active_pairs=3, max_queued_pairs=1, max_ongoing_requests=8, max_queued_requests=16)
    config = {"models": [{"name": "prism-tiny", "model": str(tiny_ckpt), "dtype": "float32", "max_length": 512,
                          "scorer": serve_tier(), "evidence": evidence}],
              "limits": {"max_new_tokens": 4000, "request_timeout_s": 120}}
    serve.run(build_app(config), name="decode", route_prefix="/decode")
    yield f"{server}/decode"
    serve.delete("decode")


def _evidence_body(doc: str, max_new_tokens: int, stream: bool = False) -> dict:
    return {"query": QUERY, "documents": [doc], "stream": stream,
            "evidence": {"top_n": 1, "max_new_tokens": max_new_tokens}}


async def _until(event: asyncio.Event, task: asyncio.Future, events: list) -> None:
    """`event`, unless `task` ends first (then its error is raised)."""
    waiter = asyncio.ensure_future(event.wait())
    await asyncio.wait_for(asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED), 60)
    if not event.is_set():
        waiter.cancel()
        task.result()
        raise AssertionError(f"the stream ended before its first delta: {events}")


async def _long_stream(ac: httpx.AsyncClient, url: str, doc: str, writing: asyncio.Event, events: list) -> None:
    """A streamed evidence request of 4000 tokens: `writing` is set at its first delta; `events` gets its kinds."""
    async with ac.stream("POST", f"{url}/v2/rerank", json=_evidence_body(doc, 4000, stream=True)) as resp:
        assert resp.status_code == 200, (await resp.aread()).decode()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and events and events[-1] == "error":
                events.append(line[6:])
            if line.startswith("event: "):
                events.append(line[7:])
                if line == "event: evidence_delta":
                    writing.set()


def test_a_short_answer_joins_a_running_decode_and_a_full_replica_refuses_with_503(decode_app):
    """Two long generations decode; a short request joins them and is answered while they still run (it never
    waits for them). Then the third slot and the one queue place fill, and the next request is refused at
    once: 503 `saturated` with Retry-After, naming the scheduler's limits. Once the streams leave, their
    slots are free again."""
    async def main():
        async with httpx.AsyncClient(timeout=120) as ac:
            long_events = [[], []]
            writing = [asyncio.Event(), asyncio.Event()]
            longs = [asyncio.ensure_future(_long_stream(ac, decode_app, f"long {i}", writing[i], long_events[i]))
                     for i in range(2)]
            for w, task, seen in zip(writing, longs, long_events):
                await _until(w, task, seen)
            short = await ac.post(f"{decode_app}/v2/rerank", json=_evidence_body("short", 4))
            assert short.status_code == 200 and short.json()["results"][0]["generated_text"]
            assert all("evidence" not in e and "done" not in e for e in long_events)  # still decoding

            more_events = [[], []]
            more_writing = [asyncio.Event(), asyncio.Event()]

            def more_stream(i: int) -> asyncio.Future:
                return asyncio.ensure_future(_long_stream(ac, decode_app, f"more {i}", more_writing[i], more_events[i]))

            # The third slot, then (once that one writes) the queue's one place: sent one after the other, since
            # two sent at once reach the scheduler in either order and the second would wait in the queue.
            more = [more_stream(0)]
            await _until(more_writing[0], more[0], more_events[0])
            more.append(more_stream(1))
            deadline = asyncio.get_running_loop().time() + 60
            while "scores" not in more_events[1]:  # the queued one was scored: its evidence call is in
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            refused = await ac.post(f"{decode_app}/v2/rerank", json=_evidence_body("one too many", 4))
            for task in longs + more:
                task.cancel()
            await asyncio.gather(*longs, *more, return_exceptions=True)
            return refused

    refused = asyncio.run(main())
    assert refused.status_code == 503, refused.text
    body = refused.json()
    assert body["type"] == "saturated" and refused.headers["retry-after"] == "1"
    assert "max_active_pairs=3" in body["message"] and "max_queued_pairs=1" in body["message"]
    deadline = time.monotonic() + 60  # the cancelled streams leave their slots at the next step
    while (r := httpx.post(f"{decode_app}/v2/rerank", json=_evidence_body("after", 4), timeout=120)).status_code == 503:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert r.status_code == 200


def test_batch_job_through_the_serve_app_equals_actor_mode(server, tiny_ckpt, tmp_path):
    """`--serve-app`: the job's batches go to the app's scorer and evidence deployments."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from batch_data import long_rows, write_files

    from prism_ray.batch import BatchConfig, run_batch
    from prism_ray.data.rows import InputError

    rows = long_rows(4, 5)
    write_files(pa.table(rows), tmp_path / "in", num_files=2)
    common = {"input": str(tmp_path / "in"), "evidence": {"top_k": 1, "max_new_tokens": 8}, "pairs_per_file": 10}
    served = run_batch(BatchConfig(output=str(tmp_path / "served"), model="prism-tiny", serve_app="prism", **common),
                       progress=False)
    run_batch(BatchConfig(output=str(tmp_path / "actors"), model=str(tiny_ckpt), dtype="float32", **common),
              progress=False)
    assert served.pairs == 20 and served.evidence == 4 and served.failed == 0
    a = {(r["query_id"], r["doc_id"]): r for r in pq.read_table(tmp_path / "served").to_pylist()}
    b = {(r["query_id"], r["doc_id"]): r for r in pq.read_table(tmp_path / "actors").to_pylist()}
    assert set(a) == set(b) == set(zip(rows["query_id"], rows["doc_id"]))
    for key in a:
        assert abs(a[key]["score"] - b[key]["score"]) <= TOL and a[key]["rank"] == b[key]["rank"]
        assert a[key]["generation"] == b[key]["generation"]
    with pytest.raises(InputError, match="no deployment prism-qwen3-evidence"):
        run_batch(BatchConfig(output=str(tmp_path / "x"), model="prism-qwen3", serve_app="prism", **common),
                  progress=False)


@pytest.mark.parametrize("app,headers", [("", []), ("/guarded", ["-H", "Authorization: Bearer secret-key"])],
                         ids=["open", "with-keys"])
def test_openapi_contract(server, tmp_path, app, headers):
    """`schemathesis run <app>/openapi.json --checks all`: every status documented, every body the schema
    admits served, every body it refuses refused, no 5xx; with keys, no endpoint but /health without one.
    Bounded in examples and time."""
    import subprocess
    import sys
    from pathlib import Path

    cmd = [str(Path(sys.executable).with_name("schemathesis")),
           "--config-file", str(Path(__file__).with_name("schemathesis.toml")),
           "run", f"{server}{app}/openapi.json", "--checks", "all", "--max-examples", "25", "--seed", "7",
           "--workers", "1", "--request-timeout", "60", "--phases", "examples,coverage,fuzzing",
           "--generation-database", "none", "--continue-on-failure", "--no-color", *headers]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "generated" in proc.stdout


def test_openapi_states_the_config_limits(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    cohere = schemas["CohereRerankRequest"]["properties"]
    assert cohere["documents"]["maxItems"] == 40 and cohere["documents"]["minItems"] == 1
    assert cohere["query"]["maxLength"] == 64
    assert schemas["EvidenceOptions"]["properties"]["max_new_tokens"]["anyOf"][0]["maximum"] == 64
    responses = spec["paths"]["/v2/rerank"]["post"]["responses"]
    assert {"200", "404", "408", "413", "422", "429", "503"} <= set(responses) and "401" not in responses
    rules = spec["paths"]["/v2/rerank"]["post"]["requestBody"]["description"]
    assert "65536 bytes" in rules and "(body_timeout_s, 408)" in rules and "32 levels (max_json_depth, 422)" in rules
    assert "securitySchemes" not in spec["components"]
    guarded = client.get("/guarded/openapi.json").json()
    assert guarded["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert "401" in guarded["paths"]["/v2/rerank"]["post"]["responses"]


def test_score_api_equals_rerank_for_the_same_pairs(client):
    docs = english_texts(4, 10, 60)
    rerank = client.post("/v2/rerank", json={"query": QUERY, "documents": docs}).json()
    by_index = {r["index"]: r["relevance_score"] for r in rerank["results"]}
    for path in ("/score", "/v1/score"):
        r = client.post(path, json={"model": "0.8b", "queries": QUERY, "documents": docs})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["index"] for d in body["data"]] == [0, 1, 2, 3] and body["model"] == "prism-tiny"
        assert all(abs(d["score"] - by_index[d["index"]]) <= TOL for d in body["data"])
        assert body["usage"]["prompt_tokens"] == rerank["meta"]["tokens"]["input_tokens"]
    other = "How high is Mount Everest?"
    other_scores = {r["index"]: r["relevance_score"]
                    for r in client.post("/v2/rerank", json={"query": other, "documents": docs}).json()["results"]}
    pairwise = client.post("/score", json={"text_1": [QUERY, other, QUERY, other], "text_2": docs}).json()
    expected = [by_index[0], other_scores[1], by_index[2], other_scores[3]]
    assert all(abs(d["score"] - e) <= TOL for d, e in zip(pairwise["data"], expected))
    logits = client.post("/score", json={"queries": QUERY, "documents": docs[:1], "use_activation": False}).json()
    assert abs(1 / (1 + math.exp(-logits["data"][0]["score"])) - by_index[0]) <= TOL


@pytest.mark.parametrize("body, field", [
    ({"queries": ["a", "b"], "documents": ["x", "y", "z"]}, "queries"),
    ({"queries": "q", "documents": []}, "documents"),
    ({"documents": ["x"]}, "queries"),
    ({"queries": "q", "documents": ["x"], "model": "nope"}, "model"),
])
def test_score_api_bad_shapes_are_4xx_naming_the_field(client, body, field):
    r = client.post("/score", json=body)
    assert r.status_code in (404, 422) and field in r.json()["message"], r.text


def test_chunked_rerank_over_http_reports_the_span(client, tiny_engine):
    long_doc = " ".join(english_texts(6, 80, 160))
    r = client.post("/v2/rerank", json={"query": QUERY, "documents": [long_doc, "Water boils at 100 C."],
                                        "chunking": {"max_chunks_per_doc": 3, "chunk_tokens": 100}})
    assert r.status_code == 200, r.text
    body = r.json()
    for res in body["results"]:
        doc = [long_doc, "Water boils at 100 C."][res["index"]]
        c = res["chunk"]
        alone = tiny_engine.score_pairs(QUERY, [doc[c["start"]:c["end"]]])[0].score
        assert abs(alone - res["relevance_score"]) <= TOL
    assert body["meta"]["warnings"] == ["documents.0 was truncated: more chunks than max_chunks_per_doc; the rest "
                                        "was not scored"]
    r = client.post("/v2/rerank", json={"query": QUERY, "documents": ["x"], "chunking": {"max_chunks_per_doc": 0}})
    assert r.status_code == 422 and "chunking.max_chunks_per_doc" in r.json()["message"]
