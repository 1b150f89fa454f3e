"""A document longer than the token budget: scored in pieces of at most the budget (the engine now) against
one forward over the whole row (what it did before, `token_budget` past the row), in one run.

    python benchmarks/bench_long_rows.py [--checkpoint checkpoints/tiny] [--tokens 10000] [--budget 1024]

Each contender runs in its own fresh process (so that its peak RSS is its own), twice, alternating, with
one document of about `--tokens` tokens and one query, float32, 2 torch threads. Prints the seconds, the
peak RSS of the call over the RSS before it (the call's working set; Linux's VmHWM, reset through
/proc/self/clear_refs) and the scores' difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import torch
sys.path.insert(0, {root!r})
from prism_ray.engine import ScoreEngine
torch.set_num_threads(2)
engine = ScoreEngine({ckpt!r}, dtype="float32", max_length={max_length}, token_budget={budget})
engine.score_pairs("warm-up", ["a short document"])
words = ("water boils at one hundred degrees at sea level and lower on a mountain " * 20000).split()
doc = " ".join(words[: {tokens}])
def hwm_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
def rss_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here (Linux)
before = rss_kib()
t0 = time.perf_counter()
[r] = engine.score_pairs("What is the boiling point of water?", [doc])
seconds = time.perf_counter() - t0
grown = hwm_kib() - before
print(json.dumps({{"seconds": seconds, "rss_mib": grown / 1024, "score": r.score, "tokens": r.num_tokens}}))
"""


def run(ckpt: str, tokens: int, budget: int) -> dict:
    code = CHILD.format(root=str(ROOT), ckpt=ckpt, max_length=tokens + 400, budget=budget, tokens=tokens)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "tiny"))
    ap.add_argument("--tokens", type=int, default=10000, help="words of the document (about as many tokens)")
    ap.add_argument("--budget", type=int, default=1024)
    args = ap.parse_args()
    arms = {f"pieces of <= {args.budget} tokens": args.budget, "one forward over the row (before)": 10 ** 9}
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for _ in range(2):
        for name, budget in arms.items():
            results[name].append(run(args.checkpoint, args.tokens, budget))
    print(f"checkpoint {args.checkpoint}, one document of {results[next(iter(arms))][0]['tokens']} prompt tokens, "
          "fp32, 2 threads, each contender twice in fresh processes, alternating")
    for name, runs in results.items():
        print(f"  {name}: " + ", ".join(f"{r['seconds']:.2f} s / peak RSS +{r['rss_mib']:.0f} MiB" for r in runs))
    scores = [r["score"] for runs in results.values() for r in runs]
    print(f"  max |score difference| between all runs: {max(scores) - min(scores):.2e}")


if __name__ == "__main__":
    main()
