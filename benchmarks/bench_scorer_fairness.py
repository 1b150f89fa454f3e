"""Short requests beside long documents at one scorer replica, under three schedules, in one run.

    python benchmarks/bench_scorer_fairness.py [--checkpoint checkpoints/tiny] [--long-tokens 10000]
        [--short-clients 4] [--short-requests 10] [--long-clients 3] [--budget 1024]

The scorer replica is built by its own constructor without Ray (as in tests/test_scorer_tier.py), float32,
with `max_batch_tokens` = `engine_token_budget` = `--budget` and no batch wait, as `deployments/local.yaml`.
Per schedule: `--short-clients` clients each send `--short-requests` requests of 8 documents of 60-140
words one after the other (the normal client of `abuse_serve.py`), first alone, then beside
`--long-clients` clients that each send one document of about `--long-tokens` tokens after the other.
The schedules:

- `round-robin, whole prefill`: requests taken in turn, a long document's prefill in one engine call
  (the scorer before: `score_encoded_groups`, and `FairBatcher(max_passed_over=1)`, under which every
  request passed over once is overdue, so the longest waiting goes first: turns);
- `round-robin, pieces`: the same turns, a long document a piece of at most the budget per call
  (`ScoreEngine.score_step`);
- `least served first, pieces`: the scorer now (`max_passed_over` = 8).

Prints the short requests' p50 / p99 alone and beside the long ones, the long ones' mean and count, and
the largest difference of any score from the first schedule's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from abuse_serve import QUERY, _normal_body, _words  # noqa: E402
from soak_serve import percentile  # noqa: E402


def _replica(ckpt: str, budget: int, max_length: int):
    from deployments.scorer import Scorer
    from prism_ray.config import ModelConfig

    model = ModelConfig.model_validate({
        "name": "bench", "model": ckpt, "dtype": "float32", "max_length": max_length,
        "scorer": {"engine_token_budget": budget, "max_batch_tokens": budget, "batch_wait_timeout_s": 0,
                   "torch_threads": 2}})
    return Scorer.func_or_class(model.model_dump(mode="json"))


async def _phase(replica, long_doc: str | None, args) -> tuple[list, list, dict]:
    """(short latencies, long latencies, {document: score}) of one phase."""
    short_s, long_s, scores = [], [], {}
    left = [args.short_clients]

    async def short_client(k: int):
        for n in range(args.short_requests):
            body = _normal_body(k * args.short_requests + n)
            t0 = time.perf_counter()
            reply = await replica.score(body["query"], body["documents"])
            short_s.append(time.perf_counter() - t0)
            scores.update(zip(body["documents"], (r.score for r in reply.results)))
        left[0] -= 1

    async def long_client():
        while left[0]:
            t0 = time.perf_counter()
            [r] = (await replica.score(QUERY, [long_doc])).results
            long_s.append(time.perf_counter() - t0)
            scores[long_doc] = r.score

    clients = [short_client(k) for k in range(args.short_clients)]
    clients += [long_client() for _ in range(args.long_clients)] if long_doc else []
    await asyncio.gather(*clients)
    return short_s, long_s, scores


async def _run(replica, long_doc: str, args) -> None:
    [warm] = (await replica.score(QUERY, [long_doc])).results
    print(f"long document: {warm.num_tokens} tokens (truncated: {warm.truncated}); budget {args.budget}; "
          f"{args.short_clients} short clients x {args.short_requests} requests of 8 documents; "
          f"{args.long_clients} long clients", flush=True)
    step, whole = replica.engine.score_step, replica.engine.score_encoded_groups
    schedules = {"round-robin, whole prefill": (whole, 1), "round-robin, pieces": (step, 1),
                 "least served first, pieces (now)": (step, replica._batcher.max_passed_over)}
    first = None
    print(f"\n{'schedule':34s} {'short alone p50/p99':>20s} {'beside long p50/p99':>22s} {'long mean (n)':>15s} {'max diff':>9s}")
    for name, (method, passed_over) in schedules.items():
        replica.engine.score_step, replica._batcher.max_passed_over = method, passed_over
        alone, _, scores = await _phase(replica, None, args)
        beside, long_s, more = await _phase(replica, long_doc, args)
        scores.update(more)
        first = first or scores
        diff = max(abs(scores[d] - first[d]) for d in scores if d in first)
        print(f"{name:34s} {1000 * statistics.median(alone):8.0f} / {1000 * percentile(alone, 0.99):5.0f} ms "
              f"{1000 * statistics.median(beside):9.0f} / {1000 * percentile(beside, 0.99):5.0f} ms "
              f"{statistics.mean(long_s):8.2f} s ({len(long_s)}) {diff:9.1e}", flush=True)
    replica.engine.score_step = step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "tiny"))
    ap.add_argument("--long-tokens", type=int, default=10000)
    ap.add_argument("--short-clients", type=int, default=4)
    ap.add_argument("--short-requests", type=int, default=10)
    ap.add_argument("--long-clients", type=int, default=3)
    ap.add_argument("--budget", type=int, default=1024)
    args = ap.parse_args()
    if args.checkpoint.endswith("checkpoints/tiny") and not Path(args.checkpoint, "config.json").exists():
        from prism_ray.checkpoints import build_checkpoint

        build_checkpoint("tiny", args.checkpoint)
    replica = _replica(args.checkpoint, args.budget, args.long_tokens + 512)
    asyncio.run(_run(replica, _words(args.long_tokens * 5), args))  # one event loop: the batcher's


if __name__ == "__main__":
    main()
