"""Evidence tier under load, over HTTP on loopback: does a short answer wait for long ones?

    python benchmarks/bench_evidence_serve.py [--long 3] [--long-tokens 384] [--clients 8] [--requests 32]

One app as `deployments/local.yaml` runs it (`prism-tiny`, one evidence replica, one torch thread, float32).
Three figures, all in this one run:

1. a short evidence request (one document, `max_new_tokens` 8) alone: median of `--repeats`;
2. the same short request sent 0.5 s after `--long` requests of `--long-tokens` tokens: its latency, the
   ratio to (1), and when each long request finished;
3. a closed loop of `--clients` clients sending `--requests` requests in all, each with `max_new_tokens`
   drawn from 8-384 (seeded): generated tokens/s and the latency p50/p99.

Generated tokens are counted from the replies: an answer cut by its `max_new_tokens` (`evidence_truncated`)
generated exactly that many; another one is counted by re-tokenizing its `generated_text` (plus its stop).
The app's evidence tier is configured with the fields the checked-out code has (`max_active_pairs` on the
scheduler, `max_batch_pairs` on the static batches before it), so the same command measures both.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism_ray.checkpoints import build_checkpoint  # noqa: E402
from prism_ray.config import EvidenceTierConfig  # noqa: E402

QUERY = "What does the with statement do?"
DOCUMENT = "The with statement wraps a block in the methods of a context manager, which run on entry and on exit."


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def body(max_new_tokens: int, doc: str = DOCUMENT) -> dict:
    return {"model": "prism-tiny", "query": QUERY, "documents": [doc],
            "evidence": {"top_n": 1, "max_new_tokens": max_new_tokens}}


def evidence_tier(slots: int) -> dict:
    key = "max_active_pairs" if "max_active_pairs" in EvidenceTierConfig.model_fields else "max_batch_pairs"
    return {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}, "torch_threads": 1, key: slots}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/tiny")
    ap.add_argument("--long", type=int, default=3, help="long requests the short one arrives behind")
    ap.add_argument("--long-tokens", type=int, default=384)
    ap.add_argument("--short-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="short requests alone (median)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32, help="requests of the closed loop, all clients together")
    ap.add_argument("--slots", type=int, default=8, help="the evidence tier's pairs decoded together")
    args = ap.parse_args()
    ckpt = Path(args.checkpoint).resolve()
    if not (ckpt / "config.json").is_file():
        build_checkpoint("tiny", ckpt)

    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from deployments.app import build_app

    tok = AutoTokenizer.from_pretrained(ckpt)

    def generated(item: dict, max_new: int) -> int:
        if item["evidence_truncated"]:
            return max_new
        return len(tok(item["generated_text"], add_special_tokens=False).input_ids) + 1

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024 * 1024)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    tier = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}, "torch_threads": 1}
    config = {"default_model": "prism-tiny",
              "models": [{"name": "prism-tiny", "model": str(ckpt), "dtype": "float32", "size": "0.8b",
                          "scorer": tier, "evidence": evidence_tier(args.slots)}],
              "limits": {"request_timeout_s": 600, "max_new_tokens": 512},
              "router": {"ray_actor_options": {"num_cpus": 0.25}}}
    serve.run(build_app(config), name="prism", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v2/rerank"

    async def post(client: httpx.AsyncClient, max_new: int, doc: str = DOCUMENT) -> tuple[float, int]:
        t0 = time.perf_counter()
        resp = await client.post(url, json=body(max_new, doc))
        resp.raise_for_status()
        return time.perf_counter() - t0, generated(resp.json()["results"][0], max_new)

    async def run() -> dict:
        out: dict = {}
        async with httpx.AsyncClient(timeout=600) as c:
            await post(c, 4)  # warm-up
            out["alone"] = [(await post(c, args.short_tokens))[0] for _ in range(args.repeats)]
            t0 = time.perf_counter()

            async def long_one(i: int) -> float:
                await post(c, args.long_tokens, f"{DOCUMENT} ({i})")
                return time.perf_counter() - t0

            longs = [asyncio.ensure_future(long_one(i)) for i in range(args.long)]
            await asyncio.sleep(0.5)
            out["loaded"] = (await post(c, args.short_tokens))[0]
            out["long_done"] = sorted(await asyncio.gather(*longs))

            rng = random.Random(0)
            todo = [rng.randint(8, 384) for _ in range(args.requests)]
            latencies: list[float] = []
            tokens = 0

            async def client() -> None:
                nonlocal tokens
                while todo:
                    max_new = todo.pop()
                    latency, n = await post(c, max_new, f"{DOCUMENT} [{len(todo)}]")
                    latencies.append(latency)
                    tokens += n

            t1 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(args.clients)))
            out["mixed_s"], out["mixed_latencies"], out["mixed_tokens"] = time.perf_counter() - t1, latencies, tokens
        return out

    try:
        r = asyncio.run(run())
    finally:
        serve.shutdown()
        ray.shutdown()

    alone = statistics.median(r["alone"])
    print(f"checkpoint: {ckpt}  evidence tier: {evidence_tier(args.slots)}")
    print(f"  short request ({args.short_tokens} tokens) alone: median {alone:.3f} s over {args.repeats}")
    print(f"  short request 0.5 s after {args.long} x {args.long_tokens} tokens: {r['loaded']:.3f} s = "
          f"{r['loaded'] / alone:.1f}x alone; long requests done at "
          + ", ".join(f"{t:.1f} s" for t in r["long_done"]))
    lat = r["mixed_latencies"]
    print(f"  closed loop, {args.clients} clients, {args.requests} requests of 8-384 tokens: "
          f"{r['mixed_tokens'] / r['mixed_s']:.1f} generated tokens/s ({r['mixed_tokens']} tokens in "
          f"{r['mixed_s']:.1f} s), latency p50 {percentile(lat, 0.5):.2f} s p99 {percentile(lat, 0.99):.2f} s")


if __name__ == "__main__":
    main()
