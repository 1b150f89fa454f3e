"""Soak: N minutes of mixed load on the Serve app; statuses, latency and every replica's memory over time.

    python benchmarks/soak_serve.py [--minutes 10] [--warmup-minutes 1] [--clients 4] [--config deployments/local.yaml]
    python benchmarks/soak_serve.py --minutes 0.67 --warmup-minutes 0 --clients 8 --sample-s 2 \
        --kill prism-tiny-scorer --kill-at 8        # the operator's experiment: SIGKILL a replica under load

Runs the config's application (default: the local test checkpoints) on a fresh local Ray cluster, on
127.0.0.1 only, and sends a closed loop of: plain rerank requests (varied document counts), evidence
requests, streamed evidence requests, and bad requests (an unknown model, an empty document list,
broken JSON). Every `--sample-s` seconds it reads each Serve replica's resident memory (VmRSS, from
/proc) and prints it. At the end: requests by kind and status, p50/p99 latency per kind, and per
replica its RSS after the warm-up, at the end, and the growth between them; the run fails (exit 1)
if any replica grew more than `--max-growth` (10 %) after warm-up, or a request got an answer its
kind should not (a 5xx, or a bad request that was not refused). `--kill DEPLOYMENT --kill-at S` sends
SIGKILL to one replica of that deployment S seconds in (its memory row then reads "gone").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUERIES = ["What is the boiling point of water at sea level?", "How do generators work in Python?",
           "Which mountain is the highest on Earth?", "How does a reranker order documents?"]
EXPECTED = {"plain": {200}, "evidence": {200}, "stream": {200}, "bad": {404, 422}}


def _documents(n: int, offset: int) -> list[str]:
    import pydoc_data.topics

    topics = [t.split() for t in pydoc_data.topics.topics.values() if len(t.split()) > 200]
    return [" ".join(topics[(offset + 7 * i) % len(topics)][: 20 + (13 * i + offset) % 120]) for i in range(n)]


def _one(client: httpx.Client, kind: str, n: int) -> int:
    query = QUERIES[n % len(QUERIES)]
    if kind == "bad":
        variant = (n // 6) % 3  # n itself is fixed mod 6 for a kind (see Soak._client)
        if variant == 0:
            return client.post("/v2/rerank", json={"model": "no-such-model", "query": query, "documents": ["x"]}).status_code
        if variant == 1:
            return client.post("/v2/rerank", json={"query": query, "documents": []}).status_code
        return client.post("/v2/rerank", content=b"{not json", headers={"content-type": "application/json"}).status_code
    body = {"query": query, "documents": _documents(5 + n % 16, n)}
    if kind != "plain":
        body["evidence"] = {"top_n": 2, "max_new_tokens": 24}
    if kind == "stream":
        with client.stream("POST", "/v2/rerank", json={**body, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("event: ")]
            return r.status_code if events[-1:] == ["event: done"] else -2
    return client.post("/v2/rerank", json=body).status_code


class Soak:
    def __init__(self, base: str, clients: int):
        self.base, self.stop = base, threading.Event()
        self.records: list[tuple[float, str, int, float]] = []  # (time, kind, status, seconds)
        self.threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]

    def _client(self, k: int) -> None:
        kinds = ("plain", "evidence", "plain", "stream", "plain", "bad")
        n = k
        with httpx.Client(base_url=self.base, timeout=120) as client:
            while not self.stop.is_set():
                kind = kinds[n % len(kinds)]
                started = time.monotonic()
                try:
                    status = _one(client, kind, n)
                except httpx.HTTPError:
                    status = -1
                self.records.append((started, kind, status, time.monotonic() - started))
                n += 1


def serve_processes(proxies: bool = False) -> dict[str, tuple[int, int]]:
    """Live Serve replicas (and with `proxies`, the HTTP proxies): name#actor -> (pid, KiB resident, VmRSS)."""
    import ray

    out = {}
    for actor_id, a in ray._private.state.actors().items():
        name = a["ActorClassName"]
        if a["State"] != "ALIVE" or not (name.startswith("ServeReplica:") or (proxies and name == "ProxyActor")):
            continue
        try:
            status = Path(f"/proc/{a['Pid']}/status").read_text()
        except OSError:
            continue
        rss = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")]
        if rss:  # a process being killed has none
            out[f"{name.split(':', 2)[-1]}#{actor_id[:6]}"] = (a["Pid"], rss[0])
    return out


def _replica_rss() -> dict[str, int]:
    """KiB of resident memory per live Serve replica, keyed by deployment and actor id."""
    return {name: kib for name, (_, kib) in serve_processes().items()}


def _kill_one(deployment: str) -> str:
    import ray

    for actor_id, a in ray._private.state.actors().items():
        if a["State"] == "ALIVE" and a["ActorClassName"].endswith(f":{deployment}"):
            os.kill(a["Pid"], signal.SIGKILL)
            return f"{deployment}#{actor_id[:6]} (pid {a['Pid']})"
    raise SystemExit(f"--kill: no live replica of {deployment}")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="deployments/local.yaml")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--warmup-minutes", type=float, default=1)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--sample-s", type=float, default=30)
    ap.add_argument("--max-growth", type=float, default=0.10)
    ap.add_argument("--kill", default=None, metavar="DEPLOYMENT", help="SIGKILL one replica of it, e.g. prism-tiny-scorer")
    ap.add_argument("--kill-at", type=float, default=8.0, metavar="S")
    args = ap.parse_args()

    import ray
    from ray import serve

    from deployments.app import build_app

    app_args = yaml.safe_load(Path(args.config).read_text())["applications"][0]["args"]
    ray.init(num_cpus=8, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="prism", route_prefix="/")
    soak = Soak(f"http://127.0.0.1:{port}", args.clients)
    started = time.monotonic()
    for t in soak.threads:
        t.start()
    samples: list[tuple[float, dict[str, int]]] = []
    total_s = 60 * (args.warmup_minutes + args.minutes)
    try:
        killed = args.kill is None
        while (elapsed := time.monotonic() - started) < total_s:
            if not killed and elapsed >= args.kill_at:
                killed = _kill_one(args.kill)
                print(f"t={elapsed:6.0f}s SIGKILL {killed} after {len(soak.records)} requests", flush=True)
            samples.append((elapsed, _replica_rss()))
            done = len(soak.records)
            print(f"t={elapsed:6.0f}s requests={done:6d} " + " ".join(
                f"{name}={kib / 1024:.0f}MiB" for name, kib in sorted(samples[-1][1].items())), flush=True)
            wait = args.sample_s if killed else min(args.sample_s, max(0.0, args.kill_at - elapsed))
            time.sleep(min(wait, max(0.0, total_s - elapsed)))
        samples.append((time.monotonic() - started, _replica_rss()))
    finally:
        soak.stop.set()
        for t in soak.threads:
            t.join(timeout=150)
        serve.shutdown()
        ray.shutdown()

    by_status: dict[str, int] = {}
    latency: dict[str, list[float]] = {}
    wrong = 0
    for _, kind, status, seconds in soak.records:
        by_status[f"{kind} {status}"] = by_status.get(f"{kind} {status}", 0) + 1
        latency.setdefault(kind, []).append(seconds)
        wrong += status not in EXPECTED[kind]
    print(f"\n{len(soak.records)} requests in {total_s / 60:.1f} min, {args.clients} clients; by kind and status:")
    print(json.dumps(by_status, indent=1, sort_keys=True))
    for kind, values in sorted(latency.items()):
        print(f"  {kind:9s} p50 {1000 * statistics.median(values):8.0f} ms   p99 {1000 * percentile(values, 0.99):8.0f} ms")
    warm_at = 60 * args.warmup_minutes
    after_warmup = next(rss for t, rss in samples if t > warm_at or (t >= warm_at and warm_at > 0))
    end = samples[-1][1]
    worst = 0.0
    print(f"\nresident memory per replica (after {args.warmup_minutes:g} min warm-up -> end):")
    for name in sorted(after_warmup):
        if name not in end:
            print(f"  {name}: gone before the end (restarted?)")
            worst = float("inf")
            continue
        growth = end[name] / after_warmup[name] - 1
        worst = max(worst, growth)
        peak = max(rss.get(name, 0) for t, rss in samples if t >= warm_at)
        print(f"  {name:40s} {after_warmup[name] / 1024:7.0f} MiB -> {end[name] / 1024:7.0f} MiB "
              f"({100 * growth:+.1f} %), peak {peak / 1024:.0f} MiB")
    memory_ok = worst <= args.max_growth or args.kill is not None  # a killed replica restarts cold
    ok = memory_ok and wrong == 0
    print(f"\nlargest growth after warm-up {100 * worst:+.1f} % (limit {100 * args.max_growth:.0f} %"
          f"{'; not judged with --kill' if args.kill else ''}); unexpected statuses {wrong}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
