"""deployments/grafana/prism-ray.json queries only what the app really exports.

A dashboard over a misspelt metric or label draws an empty panel and nobody notices. So: serve real
requests on a local Ray cluster (scores, evidence, a refused request, a stream the client leaves, and a
handle call that makes a replica raise), scrape Ray's Prometheus endpoint on 127.0.0.1, and check every
metric each PromQL query names is there, with the labels the query selects and groups by.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from conftest import free_port

pytestmark = pytest.mark.cluster  # starts a Ray cluster

DASHBOARD = Path(__file__).resolve().parents[1] / "deployments" / "grafana" / "prism-ray.json"
QUERY = "What is the boiling point of water at sea level?"
DOCS = ["Water boils at 100 degrees Celsius at sea level.", "Mount Everest is 8,849 metres high.", "The sea is salty."]



def queries(dashboard: dict) -> list[str]:
    """Every PromQL expression: panel targets and template variables."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def referenced(expr: str) -> dict[str, set[str]]:
    """metric -> the labels this expression needs on it: its matchers, `by (...)` of the aggregation
    directly around it, and the label of `label_values(metric, label)`."""
    needs: dict[str, set[str]] = defaultdict(set)
    for m in re.finditer(r"\b(ray_[A-Za-z0-9_:]+)(\{([^}]*)\})?", expr):
        needs[m.group(1)] |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*=~?", m.group(3) or ""))
    for m in re.finditer(r"by \(([^)]*)\) \(", expr):
        inner = re.search(r"\bray_[A-Za-z0-9_:]+", expr[m.end():]).group(0)
        needs[inner] |= {label.strip() for label in m.group(1).split(",")}
    for m in re.finditer(r"label_values\((ray_[A-Za-z0-9_:]+),\s*(\w+)\)", expr):
        needs[m.group(1)].add(m.group(2))
    return needs


def scrape(port: int) -> dict[str, set[str]]:
    """metric name -> label names seen on its series."""
    out: dict[str, set[str]] = defaultdict(set)
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s", line)
        if m and not line.startswith("#"):
            out[m.group(1)] |= set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', m.group(3) or ""))
    return out


def test_dashboard_is_well_formed():
    """Importable as is: unique panel ids, every query on the datasource variable, refIds per panel."""
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"} and p["targets"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    assert all(referenced(e) for e in queries(dash)), "a query that names no ray_ metric"
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("requests/s", "latency", "queue wait", "batch size", "tokens/s", "errors", "replicas"):
        assert topic in titles, topic


@pytest.fixture(scope="module")
def metrics_port(tiny_ckpt):
    """A Ray cluster (its metrics agent exports on 127.0.0.1) with one Serve app that has served traffic."""
    import ray
    from ray import serve

    from deployments.app import build_app

    ray.init(num_cpus=8, object_store_memory=128 * 1024**2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=free_port())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    tier = {"ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 1, "torch_threads": 1}
    serve.run(build_app({"models": [{"name": "prism-tiny", "model": str(tiny_ckpt), "size": "0.8b", "dtype": "float32",
                                     "max_length": 512, "scorer": tier, "evidence": {**tier, "max_active_pairs": 4}}]}),
              name="prism", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    ok = httpx.post(f"{url}/v2/rerank", json={"query": QUERY, "documents": DOCS,
                                              "evidence": {"top_n": 2, "max_new_tokens": 8}}, timeout=120)
    assert ok.status_code == 200
    assert httpx.post(f"{url}/v1/rerank", json={"model": "13b", "query": QUERY, "documents": DOCS}).status_code == 404
    # A client that leaves mid-stream: the router cancels the evidence still generating.
    body = {"query": QUERY, "documents": DOCS, "stream": True, "evidence": {"top_n": 3, "max_new_tokens": 256}}
    with httpx.stream("POST", f"{url}/v2/rerank", json=body, timeout=120) as resp:
        next(resp.iter_lines())
    # A replica that raises (the replica-exceptions panel): a handle call the router never makes.
    with pytest.raises(Exception, match="NoneType"):
        serve.get_deployment_handle("prism-tiny-scorer", app_name="prism").score.remote(QUERY, None).result()
    yield ray.nodes()[0]["MetricsExportPort"]
    serve.shutdown()
    ray.shutdown()


def test_every_queried_metric_and_label_is_exported(metrics_port):
    dash = json.loads(DASHBOARD.read_text())
    needs: dict[str, set[str]] = defaultdict(set)
    for expr in queries(dash):
        for metric, labels in referenced(expr).items():
            needs[metric] |= labels
    exported: dict[str, set[str]] = {}
    deadline = time.monotonic() + 90  # Ray's metrics agent reports every few seconds
    while time.monotonic() < deadline:
        exported = scrape(metrics_port)
        if all(m in exported for m in needs):
            break
        time.sleep(2)
    missing = sorted(m for m in needs if m not in exported)
    assert not missing, f"queried but not exported: {missing}"
    wrong_labels = {m: sorted(labels - exported[m]) for m, labels in needs.items() if labels - exported[m]}
    assert not wrong_labels, f"labels queried but not on the metric: {wrong_labels}"
    assert {"ray_prism_requests_total", "ray_prism_tokens_total", "ray_serve_num_http_requests_total",
            "ray_serve_deployment_replica_healthy"} <= set(needs)
