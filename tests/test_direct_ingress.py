"""Serve's direct ingress (`prism-ray serve --direct-ingress`): the router replica serves HTTP on its own port,
with no proxy between the client and the router. The same answers as through the proxy, and a body past
`max_body_bytes` refused while the client is still sending it: the router reads the socket itself, so nothing
buffers the rest of the body (through Serve's proxy, the proxy reads it all first). All of it again under
Serve's throughput mode (`--throughput-optimized`, which includes direct ingress; replicas call each other
over gRPC), with the evidence tier's stream and a batch job's Serve backend, which calls the app's handles
from sync code.

A cluster per mode: the variables are read by every Serve process when it starts. The proxy runs the body
guard, as `prism-ray serve` starts it.
"""

from __future__ import annotations

import json
import select
import socket

import httpx
import pytest
from conftest import environment, free_port, guarded_proxy, serve_tier

pytestmark = pytest.mark.cluster  # starts a Ray cluster

QUERY = "What is the boiling point of water at sea level?"
DOCS = ["Water boils at 100 degrees Celsius at sea level.", "Mount Everest is 8,849 metres high."]
LIMIT = 1 << 20  # the app's max_body_bytes


MODES = {"direct-ingress": "RAY_SERVE_ENABLE_DIRECT_INGRESS", "throughput-optimized": "RAY_SERVE_THROUGHPUT_OPTIMIZED"}


@pytest.fixture(scope="module", params=list(MODES))
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def app_config(tiny_ckpt, mode) -> dict:
    """The app: the scorer tier, and under the throughput mode the evidence tier too."""
    evidence = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}} if mode == "throughput-optimized" else None
    return {"models": [{"name": "prism-tiny", "model": str(tiny_ckpt), "dtype": "float32", "max_length": 512,
                        "scorer": serve_tier(), "evidence": evidence}],
            "limits": {"max_body_bytes": LIMIT}}


@pytest.fixture(scope="module")
def ways_in(mode, app_config):
    """{"proxy": base URL, "direct": the router replica's own base URL}."""
    import ray
    from ray import serve
    from ray.serve._private.api import _get_global_client

    from deployments.app import build_app

    env = {MODES[mode]: "1",
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",  # Ray's 30 s drain would slow the teardown
           **guarded_proxy({"/": app_config["limits"]})}  # as `prism-ray serve` starts it
    with environment(env):
        ray.init(num_cpus=8, object_store_memory=128 * 1024**2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_config), name="prism", route_prefix="/")
        # Serve's target groups: what a load balancer in front of the router replicas reads.
        groups = ray.get(_get_global_client()._controller.get_target_groups.remote())
        (direct,) = [t.port for g in groups if g.protocol == "HTTP" and g.app_name == "prism" for t in g.targets]
        yield {"proxy": f"http://127.0.0.1:{port}", "direct": f"http://127.0.0.1:{direct}"}
        serve.shutdown()
        ray.shutdown()


def test_the_router_answers_on_its_own_port_as_through_the_proxy(ways_in):
    body = {"model": "prism-tiny", "query": QUERY, "documents": DOCS}
    answers = {}
    for way, base in ways_in.items():
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        reply = httpx.post(f"{base}/v2/rerank", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert "scorer;dur=" in reply.headers["server-timing"]
        answers[way] = [(r["index"], r["relevance_score"]) for r in reply.json()["results"]]
    assert answers["direct"] == answers["proxy"] and len(answers["direct"]) == len(DOCS)


def _send_chunked_until_answered(port: int, total: int, piece: int = 1 << 16) -> tuple[int, int, dict]:
    """A chunked POST of `total` bytes sent until the server answers (or the body is done): (the bytes of body
    sent by then, the status, the JSON error body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v2/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        sent, chunk = 0, b"%x\r\n" % piece + b" " * piece + b"\r\n"
        while sent < total and not select.select([s], [], [], 0)[0]:
            try:
                s.sendall(chunk)
            except OSError:  # the server closed the connection after answering
                break
            sent += piece
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
            data = s.recv(65536)
            if not data:
                break
            reply += data
    head, _, rest = reply.partition(b"\r\n\r\n")
    return sent, int(head.split()[1]), json.loads(rest[:_length(reply)])


def _length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


@pytest.mark.parametrize("way", ["direct", "proxy"])
def test_a_chunked_body_past_the_limit_is_refused_while_it_is_still_being_sent(ways_in, way):
    """64 MiB announced by nothing (chunked): 413 naming `max_body_bytes` once the body passes the limit, long
    before the client could send it all; straight to the router, which reads the socket itself, and through
    Serve's proxy, whose body guard (`prism_ray.proxy_guard`) stops reading there (without it, the proxy
    had read about 30 MB into its queue by the time the router's 413 came, in the one run tried)."""
    total = 64 << 20
    port = int(ways_in[way].rsplit(":", 1)[1])
    sent, status, error = _send_chunked_until_answered(port, total)
    assert status == 413
    assert "max_body_bytes" in json.dumps(error)
    assert LIMIT < sent < total // 4  # stopped near the limit (plus what the sockets' buffers took)


@pytest.mark.parametrize("mode", ["throughput-optimized"], indirect=True)  # default mode: tests/test_serve.py
def test_under_the_throughput_mode_evidence_streams_and_a_batch_backend_calls_the_handles(mode, ways_in, app_config,
                                                                                          tiny_ckpt):
    """Serve's throughput mode moves the tiers' calls to gRPC and each replica's handlers onto its own event
    loop: the streamed answer with evidence arrives whole, both ways in, with the plain answer's scores and
    the engine's text; and a batch job's Serve backend, which calls the scorer's handle from sync code (where,
    in this mode, a handle refuses to route outside a running event loop), gets the same scores."""
    import ray

    from prism_ray.config import ModelConfig
    from prism_ray.data.backends import ServeBackend
    from prism_ray.engine import EvidenceEngine

    body = {"model": "prism-tiny", "query": QUERY, "documents": DOCS}
    plain = {r["index"]: r["relevance_score"]
             for r in httpx.post(f"{ways_in['direct']}/v2/rerank", json=body, timeout=60).json()["results"]}
    top = max(plain, key=plain.get)
    (expected,) = EvidenceEngine(tiny_ckpt, dtype="float32").generate([(QUERY, DOCS[top])], max_new_tokens=16)
    for way, base in ways_in.items():
        events, event = [], None
        with httpx.stream("POST", f"{base}/v2/rerank", timeout=120,
                          json={**body, "stream": True, "evidence": {"top_n": 1, "max_new_tokens": 16}}) as reply:
            assert reply.status_code == 200, way
            for line in reply.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: "):
                    events.append((event, json.loads(line[len("data: "):])))
        assert events[0][0] == "scores" and events[-1][0] == "done", (way, events)
        streamed = {r["index"]: r["relevance_score"] for r in events[0][1]["results"]}
        assert streamed.keys() == plain.keys()
        assert all(abs(streamed[i] - plain[i]) <= 1e-5 for i in plain), way
        (evidence,) = [d for e, d in events if e == "evidence"]
        assert (evidence["index"], evidence["generated_text"]) == (top, expected.text), way

    def backend_scores(model: dict) -> list[float]:  # in a worker started in this mode, as a batch job's actors
        (results,) = ServeBackend(ModelConfig.model_validate(model), "scorer", "prism").score([(QUERY, DOCS)])
        return [r.score for r in results]

    scores = ray.get(ray.remote(backend_scores).remote(app_config["models"][0]), timeout=120)
    assert all(abs(score - plain[i]) <= 1e-5 for i, score in enumerate(scores))
