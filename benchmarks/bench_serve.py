"""HTTP load against the local Serve app next to ScoreEngine in-process, same workload, one run.

    python benchmarks/bench_serve.py [--clients 4] [--requests 32] [--direct]

Scorer tier only, `bench` preset (built on first use), one replica with the same torch thread
count as the in-process engine. Each request: one query, 20 documents (`--documents`) of 60-180 words of real
English text. Prints throughput, p50/p99 latency, and the Serve path's single-request overhead: the
end-to-end latency minus the replica's own compute (tokenizing + engine, what ScoreEngine.score does
in-process), which the router reports per request in a `Server-Timing: scorer;dur=<ms>` header. The in-process engine is also timed while the Serve cluster
sits idle, which shows what Ray's own processes cost the compute on a small machine.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engines import documents  # noqa: E402

from prism_ray.checkpoints import build_checkpoint  # noqa: E402
from prism_ray.engine import ScoreEngine, load_model  # noqa: E402

QUERIES = [
    "How do I iterate over the items of a sequence?",
    "What does the with statement do?",
    "How are exceptions raised and handled?",
    "What is a generator expression?",
]


TINY_BODY = {"query": "What is a generator expression?", "documents": ["A generator expression yields items lazily."]}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def server_timing(resp) -> dict[str, float]:
    """The router's `Server-Timing` header in seconds per entry (`scorer`, `router`)."""
    entries = (e.strip().split(";dur=") for e in resp.headers["server-timing"].split(","))
    return {name: float(ms) / 1000 for name, ms in entries}


def start_local_serve(num_cpus: int = 4, direct: bool = False, throughput_optimized: bool = False,
                      proxy_guard: bool = True) -> int:
    """A local Ray cluster and Serve on a free loopback port; returns the port. With `direct`, Serve's direct
    ingress is on too: each app's ingress replica also serves HTTP on its own port (`ingress_ports`). With
    `throughput_optimized`, Serve's throughput mode (what `prism-ray serve --throughput-optimized` turns on;
    it includes direct ingress). With `proxy_guard` (the default), Serve's proxy runs prism-ray's body guard,
    as under `prism-ray serve`."""
    import os

    import ray
    from ray import serve

    from prism_ray.cli import serve_environment
    from prism_ray.config import LimitsConfig

    # read by every Serve process at import: set before the cluster starts them. The proxy runs the body guard
    # under the default limits, as `prism-ray serve` starts it.
    os.environ.update(serve_environment(os.environ, direct, throughput_optimized,
                                        {"/": LimitsConfig()} if proxy_guard else None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def ingress_ports() -> dict[str, int]:
    """Under direct ingress, each app's ingress replica's own HTTP port (the first replica's), from Serve's
    target groups: the list a load balancer in front of the replicas reads."""
    import ray
    from ray.serve._private.api import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote())
    return {g.app_name: g.targets[0].port for g in groups if g.protocol == "HTTP" and g.targets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/bench")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32, help="total requests in the load phase")
    ap.add_argument("--documents", type=int, default=20, help="documents per request")
    ap.add_argument("--single", type=int, default=8, help="sequential requests for the latency overhead")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--direct", action="store_true",
                    help="also measure Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1): the same "
                         "requests straight to the router replica, after those through the proxy")
    ap.add_argument("--throughput-optimized", action="store_true",
                    help="run Serve in its throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, which includes "
                         "direct ingress); compare with a run without it")
    args = ap.parse_args()
    ckpt = Path(args.checkpoint).resolve()
    if not (ckpt / "config.json").is_file():
        build_checkpoint("bench", ckpt)
    docs = documents(args.documents)
    bodies = [{"query": QUERIES[i % len(QUERIES)], "documents": docs} for i in range(args.requests)]

    torch.set_num_threads(args.threads)
    engine = ScoreEngine(load_model(ckpt, dtype="float32"))
    engine.score_pairs(bodies[0]["query"], docs)  # warm-up

    def engine_singles(items) -> list[float]:
        times = []
        for body in items:
            t0 = time.perf_counter()
            engine.score_pairs(body["query"], body["documents"])
            times.append(time.perf_counter() - t0)
        return times

    import ray
    from ray import serve

    from deployments.app import build_app

    port = start_local_serve(direct=args.direct, throughput_optimized=args.throughput_optimized)
    config = {"models": [{"name": "bench", "model": str(ckpt), "dtype": "float32", "evidence": None,
                          "scorer": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1},
                                     "torch_threads": args.threads, "max_batch_tokens": 1024}}]}
    serve.run(build_app(config), name="bench", route_prefix="/")
    urls = {"through Serve's proxy": f"http://127.0.0.1:{port}/v2/rerank"}
    if args.direct:
        urls["direct to the router replica"] = f"http://127.0.0.1:{ingress_ports()['bench']}/v2/rerank"

    def measure(url: str) -> dict:
        out = {"single": [], "replica": [], "tiny": [], "tiny_replica": []}  # latency; the replica's compute
        with httpx.Client(timeout=600) as c:
            c.post(url, json=bodies[0]).raise_for_status()  # warm-up
            for body in bodies[: args.single]:
                t0 = time.perf_counter()
                resp = c.post(url, json=body).raise_for_status()
                out["single"].append(time.perf_counter() - t0)
                assert len(resp.json()["results"]) == len(body["documents"]), "a response lost documents"
                out["replica"].append(server_timing(resp)["scorer"])
            for _ in range(args.single):  # a one-document request: mostly the fixed cost of the path
                t0 = time.perf_counter()
                resp = c.post(url, json=TINY_BODY).raise_for_status()
                out["tiny"].append(time.perf_counter() - t0)
                out["tiny_replica"].append(server_timing(resp)["scorer"])

        async def load():
            latencies: list[float] = []
            queue = list(bodies)
            async with httpx.AsyncClient(timeout=600) as ac:
                async def client():
                    while queue:
                        body = queue.pop()
                        t0 = time.perf_counter()
                        resp = (await ac.post(url, json=body)).raise_for_status()
                        latencies.append(time.perf_counter() - t0)
                        assert len(resp.json()["results"]) == len(body["documents"]), "a response lost documents"
                t0 = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(args.clients)))
                return time.perf_counter() - t0, latencies

        out["http_time"], out["latencies"] = asyncio.run(load())
        return out

    try:
        measured = {way: measure(url) for way, url in urls.items()}
        # The same engine in this process while the cluster sits idle: what Ray's own processes cost it.
        engine_up = engine_singles(bodies[: args.single])
    finally:
        serve.shutdown()
        ray.shutdown()

    engine_single = engine_singles(bodies[: args.single])
    t0 = time.perf_counter()
    for body in bodies:
        engine.score_pairs(body["query"], body["documents"])
    engine_time = time.perf_counter() - t0
    engine_tiny = engine_singles([TINY_BODY] * args.single)

    med = statistics.median
    ms = lambda x: f"{1000 * x:.0f} ms"  # noqa: E731
    pairs = sum(len(b["documents"]) for b in bodies)
    print(f"checkpoint: {ckpt}  dtype: float32  torch threads: {args.threads}  "
          f"requests: {len(bodies)} x {args.documents} documents  clients: {args.clients}  Serve's throughput mode: "
          f"{'on' if args.throughput_optimized else 'off'}")
    print(f"  ScoreEngine in-process:         {pairs / engine_time:7.2f} pairs/s")
    for way, m in measured.items():
        single, replica, tiny, tiny_replica = m["single"], m["replica"], m["tiny"], m["tiny_replica"]
        print(f"  HTTP ({way}, 1 scorer replica): {pairs / m['http_time']:7.2f} pairs/s  "
              f"p50 {ms(percentile(m['latencies'], 0.5))}  p99 {ms(percentile(m['latencies'], 0.99))}; "
              f"HTTP / in-process throughput = {100 * engine_time / m['http_time']:.0f}%")
        print(f"    single {args.documents}-document request ({args.single} sequential): HTTP median {ms(med(single))}; replica "
              f"compute (tokenizing + engine, Server-Timing) median {ms(med(replica))}; Serve path overhead "
              f"(HTTP - replica compute, median over requests) {ms(med([a - b for a, b in zip(single, replica)]))}; "
              f"HTTP - in-process (Ray down): {ms(med(single) - med(engine_single))}")
        print(f"    one-document request: HTTP median {ms(med(tiny))}, replica compute {ms(med(tiny_replica))}, "
              f"Serve path overhead {ms(med([a - b for a, b in zip(tiny, tiny_replica)]))}; "
              f"in-process engine {ms(med(engine_tiny))}")
    print(f"  in-process engine, single {args.documents}-document request: median {ms(med(engine_single))} with Ray down, "
          f"{ms(med(engine_up))} with the Serve cluster up and idle")


if __name__ == "__main__":
    main()
