"""Serving under failure, on a real local Ray cluster over HTTP on 127.0.0.1.

A closed loop of clients (plain, evidence and streamed-evidence requests) runs while a scorer replica,
then the only evidence replica, is killed with SIGKILL, and while the app is redeployed with changed
replica counts and a model added: every request must answer 200 (or 503 with Retry-After). Then the
deadline (504) and cancellation: a request past its deadline, or a client that disconnects, must not
keep the evidence tier busy for the whole of its generation.

One cluster, two applications: `prism` (request_timeout_s 60) and `tight` under /tight (2 s).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from conftest import english_texts, free_port, serve_tier

pytestmark = pytest.mark.cluster

QUERY = "What is the boiling point of water at sea level?"
DOCS = english_texts(5, 20, 60)




def _tier(**extra):
    return serve_tier(graceful_shutdown_timeout_s=30, **extra)


def _tiny(ckpt, scorer_replicas=2) -> dict:
    return {"name": "prism-tiny", "model": str(ckpt), "size": "0.8b", "dtype": "float32", "max_length": 512,
            "scorer": _tier(num_replicas=scorer_replicas), "evidence": _tier(max_active_pairs=8)}


def _config(ckpt, timeout_s: float, scorer_replicas=2, extra_models=()) -> dict:
    return {"models": [_tiny(ckpt, scorer_replicas), *extra_models],
            "limits": {"max_new_tokens": 4000, "request_timeout_s": timeout_s},
            "router": {"ray_actor_options": {"num_cpus": 0.5}}}


@pytest.fixture(scope="module")
def cluster(tiny_ckpt):
    import ray
    from ray import serve

    from deployments.app import build_app

    ray.init(num_cpus=8, object_store_memory=128 * 1024**2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(_config(tiny_ckpt, 60)), name="prism", route_prefix="/")
    serve.run(build_app(_config(tiny_ckpt, 2, scorer_replicas=1)), name="tight", route_prefix="/tight")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _replica_pids(app: str, deployment: str) -> list[int]:
    import ray

    name = f"ServeReplica:{app}:{deployment}"
    return [a["Pid"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == name and a["State"] == "ALIVE"]


def _request(client: httpx.Client, kind: str) -> tuple[int, dict | None]:
    """(status, problem) for one request of a kind; problem describes anything but a clean answer."""
    body = {"model": "prism-tiny", "query": QUERY, "documents": DOCS}
    if kind != "plain":
        body["evidence"] = {"top_n": 2, "max_new_tokens": 8}
    if kind != "stream":
        r = client.post("/v2/rerank", json=body)
        if r.status_code == 503 and "retry-after" not in r.headers:
            return r.status_code, {"kind": kind, "why": "503 without Retry-After"}
        if r.status_code == 200 and len(r.json()["results"]) != len(DOCS):
            return r.status_code, {"kind": kind, "why": "wrong result count"}
        return r.status_code, None if r.status_code in (200, 503) else {"kind": kind, "body": r.text[:300]}
    with client.stream("POST", "/v2/rerank", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return r.status_code, {"kind": kind, "body": r.read().decode()[:300]}
        lines = list(r.iter_lines())
    events = [line[7:] for line in lines if line.startswith("event: ")]
    errors = [line[6:] for e, line in zip(lines, lines[1:]) if e == "event: error"]
    done_ok = events[:1] == ["scores"] and events[-1:] == ["done"] and "error" not in events
    return 200, None if done_ok else {"kind": kind, "events": [e for e in events if e != "evidence_delta"],
                                      "errors": errors}


class Load:
    """`clients` threads in a closed loop until stopped (and at most `max_s`); statuses by kind."""

    def __init__(self, base: str, clients: int = 4, max_s: float = 120):
        self.base, self.max_s = base, max_s
        self.stop = threading.Event()
        self.results: list[tuple[str, int, dict | None]] = []
        self.threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]

    def _client(self, k: int) -> None:
        kinds = ("plain", "evidence", "stream")
        started = time.monotonic()
        with httpx.Client(base_url=self.base, timeout=90) as client:
            n = k
            while not self.stop.is_set() and time.monotonic() - started < self.max_s:
                kind = kinds[n % 3]
                try:
                    status, problem = _request(client, kind)
                except httpx.HTTPError as exc:
                    status, problem = -1, {"kind": kind, "error": repr(exc)}
                self.results.append((kind, status, problem))
                n += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def summary(self) -> dict:
        out: dict[str, int] = {}
        for kind, status, _ in self.results:
            out[f"{kind}:{status}"] = out.get(f"{kind}:{status}", 0) + 1
        return out


def _wait_running(app: str, deployment: str, n: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while len(_replica_pids(app, deployment)) < n:
        assert time.monotonic() < deadline, f"{deployment} did not get back to {n} replicas"
        time.sleep(0.5)


def _wait_ready(client: httpx.Client, timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.get("/health/ready")
        if r.status_code == 200 or time.monotonic() > deadline:
            return r
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        time.sleep(0.5)


@pytest.fixture(scope="module")
def client(cluster):
    with httpx.Client(base_url=cluster, timeout=90) as c:
        yield c


def test_ready_once_every_tier_runs(client):
    r = _wait_ready(client)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ready", "replicas": {"prism-tiny-scorer": 2, "prism-tiny-evidence": 1}}
    assert client.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize("deployment, replicas", [("prism-tiny-scorer", 2), ("prism-tiny-evidence", 1)])
def test_sigkill_a_replica_under_load_loses_no_request(cluster, client, deployment, replicas):
    _wait_running("prism", deployment, replicas)
    with Load(cluster) as load:
        time.sleep(4)
        victim = _replica_pids("prism", deployment)[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = len(load.results)
        _wait_running("prism", deployment, replicas)
        time.sleep(3)  # traffic on the restarted replica too
    problems = [p for _, s, p in load.results if p is not None or s not in (200, 503)]
    print(f"SIGKILL {deployment} after {killed_at} requests: {load.summary()}")  # shown with -s
    assert not problems, (load.summary(), problems[:5])
    assert killed_at > 3 and len(load.results) > killed_at + 3, load.summary()
    assert {k for k, s, _ in load.results if s == 200} == {"plain", "evidence", "stream"}
    assert _wait_ready(client).status_code == 200


def test_redeploy_with_changed_replicas_and_a_new_model_under_load(cluster, client, tiny_ckpt, qwen3_ckpt):
    from ray import serve

    from deployments.app import build_app

    qwen3 = {"name": "prism-qwen3", "model": str(qwen3_ckpt), "size": "4b-exp", "dtype": "float32",
             "scorer": _tier(), "evidence": None}
    with Load(cluster) as load:
        time.sleep(3)
        before = len(load.results)
        serve.run(build_app(_config(tiny_ckpt, 60, scorer_replicas=1, extra_models=[qwen3])), name="prism",
                  route_prefix="/")
        time.sleep(3)
    problems = [p for _, s, p in load.results if p is not None or s != 200]
    print(f"redeploy after {before} requests: {load.summary()}")  # shown with -s
    assert not problems, (load.summary(), problems[:5])
    assert before > 0 and len(load.results) > before + 3, load.summary()
    r = client.post("/v2/rerank", json={"model": "4b-exp", "query": QUERY, "documents": DOCS[:2]})
    assert r.status_code == 200 and r.json()["results"][0]["model"] == "prism-qwen3" if "model" in \
        r.json()["results"][0] else r.status_code == 200
    assert _wait_ready(client).json()["replicas"] == {"prism-tiny-scorer": 1, "prism-tiny-evidence": 1,
                                                     "prism-qwen3-scorer": 1}


def _evidence_seconds(client: httpx.Client, prefix: str, max_new_tokens: int) -> float:
    started = time.monotonic()
    r = client.post(f"{prefix}/v2/rerank", json={"query": QUERY, "documents": DOCS[:1],
                                                 "evidence": {"top_n": 1, "max_new_tokens": max_new_tokens}})
    assert r.status_code == 200, r.text
    return time.monotonic() - started


def _seconds_per_token(client: httpx.Client) -> float:
    """Decode time per token of the tiny model's evidence replica (the apps' replicas are alike)."""
    return (_evidence_seconds(client, "", 120) - _evidence_seconds(client, "", 1)) / 119


def test_past_the_deadline_a_504_and_the_generation_is_cancelled(client):
    per_token = _seconds_per_token(client)
    full_s = 3000 * per_token  # what a 3000-token generation would keep the evidence replica busy for
    assert full_s > 8, f"the tiny model decodes too fast ({per_token * 1000:.1f} ms/token) for this test"
    started = time.monotonic()
    r = client.post("/tight/v2/rerank", json={"query": QUERY, "documents": DOCS[:1],
                                              "evidence": {"top_n": 1, "max_new_tokens": 3000}})
    waited = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert r.json()["type"] == "timeout" and "request_timeout_s=2" in r.json()["message"]
    assert 1.9 < waited < 5
    # The next request on the same (only) evidence replica does not wait for the abandoned generation.
    next_s = _evidence_seconds(client, "/tight", 4)
    assert next_s < full_s / 3, (next_s, full_s)


def test_stream_past_the_deadline_ends_with_timeout_error_events(client):
    with client.stream("POST", "/tight/v2/rerank", json={
            "query": QUERY, "documents": DOCS[:2], "stream": True, "evidence": {"top_n": 2, "max_new_tokens": 3000}}) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    events = [line[7:] for line in lines if line.startswith("event: ")]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    ended = [(e, d) for e, d in zip(events, data) if e != "evidence_delta"]
    assert [e for e, _ in ended] == ["scores", "error", "error", "done"]
    assert "evidence_delta" in events and events.index("evidence_delta") < events.index("error")  # text came first
    assert {d["type"] for _, d in ended[1:3]} == {"timeout"}
    assert data[-1] == {"evidence_documents": 0, "failed": 2}


def test_a_client_that_disconnects_cancels_its_generation(client, cluster):
    full_s = 3000 * _seconds_per_token(client)
    with httpx.Client(base_url=cluster, timeout=90) as leaving:
        with leaving.stream("POST", "/v2/rerank", json={
                "query": QUERY, "documents": DOCS[:1], "stream": True,
                "evidence": {"top_n": 1, "max_new_tokens": 3000}}) as r:
            first = next(r.iter_lines())
            assert first == "event: scores"
        # leaving the block closes the connection mid-stream
    time.sleep(1)
    next_s = _evidence_seconds(client, "", 4)
    assert next_s < full_s / 3, (next_s, full_s)
