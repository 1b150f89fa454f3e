"""The serving path's own cost: one client, sequential one-document requests, through a scorer that waits for
a batch to gather (`batch_wait_timeout_s`, the old default 5 ms) and one that starts as soon as it is free (0,
the default now), in one app, in one run; next to `GET /health` and the in-process engine.

    python benchmarks/bench_serve_path.py [--requests 40] [--checkpoint checkpoints/tiny] [--direct]
                                          [--throughput-optimized] [--no-proxy-guard]

Both models are the same checkpoint (`prism-tiny` widths: the engine's own compute is small, so what is
left is the path), one replica each, one torch thread; requests alternate between them so that drift on
the machine hits both alike. The path is the HTTP latency minus the replica's own compute (tokenizing + the
engine call, which the router reports as `Server-Timing: scorer;dur=`); the router's own time outside its tier
calls is `Server-Timing: router;dur=`, and the rest is Serve's hops (proxy -> router -> scorer and back) and
the scorer's queue. Next to them, in the same cluster, Serve's floor: an ingress that does nothing, and one
that awaits one handle call to a deployment that does nothing. With `--direct` (Serve's direct ingress), every
request is also sent straight to the app's ingress replica, which then serves HTTP on its own port, with no
proxy in the way: both ways in, in one cluster, in turn. Prints its own figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch
from fastapi import FastAPI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_serve import ingress_ports, server_timing, start_local_serve  # noqa: E402

from prism_ray.checkpoints import build_checkpoint  # noqa: E402
from prism_ray.engine import ScoreEngine, load_model  # noqa: E402

BODY = {"query": "What is a generator expression?", "documents": ["A generator expression yields items lazily."]}
WAITS = {"wait-5ms": 0.005, "wait-0": 0.0}


def service_steps(ckpt: Path, rounds: int = 200) -> dict[str, float]:
    """Median ms of each step the router takes for BODY outside the tiers, in this process."""
    from transformers import AutoTokenizer

    from deployments.router import parse_json_object
    from prism_ray.api import JinaRerankRequest, job_from_jina
    from prism_ray.config import AppConfig
    from prism_ray.prompt import PrismPromptTokenizer
    from prism_ray.results import ScoreReply, ScoreResult, Timing
    from prism_ray.service import RerankService

    cfg = AppConfig.model_validate({"models": [{"name": "m", "model": str(ckpt)}]})
    prompts = {"m": PrismPromptTokenizer(AutoTokenizer.from_pretrained(ckpt), max_length=cfg.models[0].max_length)}

    async def score(model, query, documents, max_doc_tokens):
        return ScoreReply([ScoreResult(0.5, 0.0, 10, False) for _ in documents], Timing(0.0))

    svc = RerankService(cfg, prompts, score=score, evidence=None)
    raw = json.dumps(BODY).encode()
    names = ["parse the JSON body", "build the request model", "prepare (on an executor)", "rank", "respond"]

    async def once() -> list[float]:
        loop = asyncio.get_running_loop()
        t = [time.perf_counter()]
        body = parse_json_object(raw, 32)
        t.append(time.perf_counter())
        job = job_from_jina(JinaRerankRequest.model_validate(body))
        t.append(time.perf_counter())
        prepared = await loop.run_in_executor(None, svc.prepare, job)
        t.append(time.perf_counter())
        ranked = await svc.rank(job, prepared)
        t.append(time.perf_counter())
        await svc.respond(job, prepared, ranked)
        t.append(time.perf_counter())
        return [b - a for a, b in zip(t, t[1:])]

    async def run() -> list[list[float]]:
        return [await once() for _ in range(rounds)]

    rows = asyncio.run(run())[rounds // 10:]
    return {n: 1000 * statistics.median(r[i] for r in rows) for i, n in enumerate(names)} | {
        "total": 1000 * statistics.median(sum(r) for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "tiny"))
    ap.add_argument("--requests", type=int, default=40, help="per model")
    ap.add_argument("--throughput-optimized", action="store_true",
                    help="run Serve in its throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, which includes "
                         "direct ingress); compare with a run without it")
    ap.add_argument("--direct", action="store_true",
                    help="also measure Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1), side by side "
                         "with the proxy in the same cluster")
    ap.add_argument("--no-proxy-guard", action="store_true",
                    help="Serve's proxy without prism-ray's body guard (`prism-ray serve --no-proxy-guard`)")
    args = ap.parse_args()
    ckpt = Path(args.checkpoint).resolve()
    if not (ckpt / "config.json").is_file():
        build_checkpoint("tiny", ckpt)

    steps = service_steps(ckpt)
    torch.set_num_threads(1)
    engine = ScoreEngine(load_model(ckpt, dtype="float32"))
    engine.score_pairs(BODY["query"], BODY["documents"])
    in_process = []
    for _ in range(args.requests):
        t0 = time.perf_counter()
        engine.score_pairs(BODY["query"], BODY["documents"])
        in_process.append(time.perf_counter() - t0)
    del engine

    import ray
    from ray import serve

    from deployments.app import build_app

    port = start_local_serve(direct=args.direct, throughput_optimized=args.throughput_optimized,
                             proxy_guard=not args.no_proxy_guard)
    models = [{"name": name, "model": str(ckpt), "dtype": "float32", "evidence": None,
               "scorer": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}, "torch_threads": 1,
                          "batch_wait_timeout_s": wait}} for name, wait in WAITS.items()]
    serve.run(build_app({"models": models}), name="path", route_prefix="/")
    serve.run(floor_app(), name="floor", route_prefix="/floor")
    # Each way in: (the router's base URL, the floor app's base URL). Through Serve's proxy always; with
    # --direct also straight to each app's ingress replica (under the app's route prefix, as the proxy).
    ways = {"proxy": (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/floor")}
    if args.direct:
        direct = ingress_ports()
        ways["direct"] = (f"http://127.0.0.1:{direct['path']}", f"http://127.0.0.1:{direct['floor']}/floor")
    keys = [(way, name) for way in ways for name in WAITS]
    latency: dict[tuple, list[float]] = {k: [] for k in keys}
    compute: dict[tuple, list[float]] = {k: [] for k in keys}
    router: dict[tuple, list[float]] = {k: [] for k in keys}
    health: dict[str, list[float]] = {way: [] for way in ways}
    floor: dict[tuple, list[float]] = {(way, what): [] for way in ways for what in ("GET /health", "POST /hop")}
    try:
        with httpx.Client(timeout=60) as c:
            for base, floor_base in ways.values():  # warm-up
                for name in WAITS:
                    c.post(f"{base}/v2/rerank", json={**BODY, "model": name}).raise_for_status()
                c.post(f"{floor_base}/hop", json=BODY).raise_for_status()
            for _ in range(args.requests):  # every way and model in turn: drift on the machine hits all alike
                for way, (base, floor_base) in ways.items():
                    for name in WAITS:
                        t0 = time.perf_counter()
                        resp = c.post(f"{base}/v2/rerank", json={**BODY, "model": name}).raise_for_status()
                        latency[way, name].append(time.perf_counter() - t0)
                        timing = server_timing(resp)
                        compute[way, name].append(timing["scorer"])
                        router[way, name].append(timing["router"])
                    t0 = time.perf_counter()
                    c.get(f"{base}/health").raise_for_status()
                    health[way].append(time.perf_counter() - t0)
                    for what in ("GET /health", "POST /hop"):
                        method, path = what.split()
                        t0 = time.perf_counter()
                        c.request(method, floor_base + path, json=BODY if method == "POST" else None).raise_for_status()
                        floor[way, what].append(time.perf_counter() - t0)
    finally:
        serve.shutdown()
        ray.shutdown()

    med = statistics.median
    ms = lambda x: f"{1000 * x:.1f} ms"  # noqa: E731
    print(f"checkpoint: {ckpt}  float32, 1 torch thread, {args.requests} sequential one-document requests per "
          f"model; Serve's throughput mode: {'on' if args.throughput_optimized else 'off'}; the proxy's body guard: "
          f"{'off' if args.no_proxy_guard else 'on'}")
    print("  the router's own work without Ray (median): " + ", ".join(f"{k} {v:.2f} ms" for k, v in steps.items()))
    print(f"  in-process ScoreEngine: median {ms(med(in_process))}")
    for way in ways:
        via = "through Serve's proxy" if way == "proxy" else "direct to the ingress replica (no proxy)"
        print(f"  {way}: {via}")
        print(f"    GET /health (router): median {ms(med(health[way]))}")
        hop = med(floor[way, "POST /hop"]) - med(floor[way, "GET /health"])
        print("    Serve's own floor (a FastAPI ingress that does nothing; one that awaits one handle call to a "
              "deployment that returns its argument): " + ", ".join(
                  f"{what} median {ms(med(floor[way, what]))}" for what in ("GET /health", "POST /hop"))
              + f"; one handle hop {ms(hop)}")
        for name, wait in WAITS.items():
            k = (way, name)
            path = [a - b for a, b in zip(latency[k], compute[k])]
            hops = [p - r for p, r in zip(path, router[k])]
            print(f"    batch_wait_timeout_s={wait:g} ({name}): HTTP median {ms(med(latency[k]))}, replica compute "
                  f"{ms(med(compute[k]))}, path (HTTP - compute) median {ms(med(path))}, of which the router's own "
                  f"(Server-Timing router) {ms(med(router[k]))} and Serve's hops and the scorer's queue "
                  f"{ms(med(hops))}; in-process / HTTP = {med(in_process) / med(latency[k]):.0%}")

def floor_app():
    """What Serve costs with no work at all: an ingress like the router (FastAPI, the JSON body read) whose
    `/hop` awaits one handle call, to a deployment that returns its argument."""
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        async def __call__(self, x):
            return x

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Ingress:
        def __init__(self, echo):
            self.echo = echo

        @api.get("/health")
        async def health(self) -> dict:
            return {"status": "ok"}

        @api.post("/hop")
        async def hop(self, body: dict) -> dict:  # the JSON body parsed (a builtin annotation: Serve pickles this)
            return {"n": await self.echo.remote(len(body))}

    return Ingress.bind(Echo.bind())


if __name__ == "__main__":
    main()
