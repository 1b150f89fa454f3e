"""The scorer tier's batches sized by prompt tokens vs by the engine's work, and query prefixes run per engine
call vs kept between calls, in one run.

    python benchmarks/bench_scorer_sizing.py [--checkpoint checkpoints/bench] [--preset bench] [--requests 4]
        [--documents 20] [--budget 1024] [--threads 2]

Every Prism prompt starts with the same system prompt and instruction, and each row reads it (and, on a CPU,
its query's prefix) from a cached state, so a row computes only its own tail. The scorer replica, built by its
own constructor without Ray (as in tests/test_scorer_tier.py), float32, `max_batch_tokens` =
`engine_token_budget` = `--budget`, no batch wait, sizes its items and batches with
`ScoreEngine.row_tokens`; "by prompt tokens" patches that to a pair's whole prompt, as the tier counted
before. "prefix per call" makes the prefix cache keep no query prefix, so each engine call runs its query's
prefix again, as before; "kept" keeps the last few (`prism_ray.engine.prefix.RECENT_PREFIXES`). Requests of
`--documents` documents of 60-180 words (`bench_engines.documents`) are sent one after the other, the
settings in turn, `--requests` each. Prints per setting the median seconds per request, the engine calls per
request with their tokens of work, pairs/s; the same documents through `ScoreEngine.score_pairs` in this
process (prefixes kept); and the largest score difference from the first setting.
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

from bench_engines import documents  # noqa: E402

QUERIES = ["How do I iterate over the items of a sequence?", "What does the with statement do?",
           "How are exceptions raised and handled?", "What is a generator expression?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="default: checkpoints/<preset>, built on first use")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--requests", type=int, default=4, help="per sizing")
    ap.add_argument("--documents", type=int, default=20)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from deployments.scorer import Scorer
    from prism_ray.checkpoints import build_checkpoint
    from prism_ray.config import ModelConfig
    from prism_ray.engine.prefix import RECENT_PREFIXES
    from prism_ray.engine.score import Partial

    ckpt = Path(args.checkpoint or ROOT / "checkpoints" / args.preset).resolve()
    if not (ckpt / "config.json").is_file():
        build_checkpoint(args.preset, ckpt)
    model = ModelConfig.model_validate({
        "name": "bench", "model": str(ckpt), "dtype": "float32", "evidence": None,
        "scorer": {"engine_token_budget": args.budget, "max_batch_tokens": args.budget, "batch_wait_timeout_s": 0,
                   "torch_threads": args.threads}})
    replica = Scorer.func_or_class(model.model_dump(mode="json"))
    engine = replica.engine
    by_work = engine.row_tokens

    def by_prompt(prefix, entry):  # the tier before: a pair counted by its whole prompt
        return entry.remaining if isinstance(entry, Partial) else entry.num_tokens

    sizings = {"by prompt tokens, prefix per call (before)": (by_prompt, 0),
               "by engine work, prefix per call": (by_work, 0),
               "by engine work, prefix kept (now)": (by_work, RECENT_PREFIXES)}
    calls: list[int] = []
    step = engine.score_step

    def counting(groups):
        calls.append(sum(by_work(prefix, p) for prefix, pairs in groups for p in pairs))
        return step(groups)

    engine.score_step = counting
    docs = documents(args.documents)
    seconds = {name: [] for name in sizings}
    per_call = {name: [] for name in sizings}
    scores = {name: {} for name in sizings}
    asyncio.run(replica.score(QUERIES[0], docs))  # warm-up
    for r in range(args.requests):
        query = QUERIES[r % len(QUERIES)]
        for name, (sizing, keep) in sizings.items():
            engine.row_tokens, engine.loaded.prefixes.keep = sizing, keep
            engine.loaded.prefixes._recent.clear()
            calls.clear()
            t0 = time.perf_counter()
            reply = asyncio.run(replica.score(query, docs))
            seconds[name].append(time.perf_counter() - t0)
            per_call[name].append(list(calls))
            scores[name][r] = [x.score for x in reply.results]
    engine.row_tokens, engine.score_step, engine.loaded.prefixes.keep = by_work, step, RECENT_PREFIXES
    in_process = []
    for r in range(args.requests):
        t0 = time.perf_counter()
        engine.score_pairs(QUERIES[r % len(QUERIES)], docs)
        in_process.append(time.perf_counter() - t0)

    med = statistics.median
    print(f"checkpoint: {ckpt}  float32, {args.threads} torch threads, budget {args.budget}, "
          f"{args.requests} requests x {args.documents} documents per sizing, in turn")
    for name in sizings:
        work = per_call[name][-1]
        print(f"  {name:42s} median {med(seconds[name]):.3f} s per request ({args.documents / med(seconds[name]):.2f} "
              f"pairs/s); {len(work)} engine calls of {min(work)}-{max(work)} tokens of work")
    print(f"  {'ScoreEngine.score_pairs':42s} median {med(in_process):.3f} s per request "
          f"({args.documents / med(in_process):.2f} pairs/s)")
    a = scores[next(iter(sizings))]
    print(f"  max |score difference| from the first setting: "
          f"{max(abs(x - y) for b in scores.values() for r in a for x, y in zip(a[r], b[r])):.2e}")


if __name__ == "__main__":
    main()
