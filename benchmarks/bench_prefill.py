"""EvidenceEngine prefill: one pair per forward against packed batches of pairs, side by side.

    python benchmarks/bench_prefill.py --preset 0.8b --dtype auto
    python benchmarks/bench_prefill.py --preset 0.8b --dtype float32

Times `generate(pairs, max_new_tokens=1)` (the shared prefix, every pair's prefill and its first token, no
decode) for each prefill token budget, the budgets taking turns within each repeat, and checks that they
agree (first-token logit difference). This is what `DEFAULT_PREFILL_BUDGET` in
`prism_ray/engine/evidence.py` was chosen from. Prints its own figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engines import QUERY, documents, interleaved  # noqa: E402

from prism_ray.checkpoints import preset_checkpoint  # noqa: E402
from prism_ray.engine import EvidenceEngine, load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.8b")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--budgets", default="1,1024,4096", help="prefill token budgets (1: one pair per forward)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ckpt = preset_checkpoint(args.preset)
    loaded = load_model(ckpt, dtype=args.dtype)
    budgets = [int(b) for b in args.budgets.split(",")]
    engines = [EvidenceEngine(loaded, token_budget=b) for b in budgets]
    pairs = [(QUERY, d) for d in documents(args.pairs)]
    for engine in engines:
        engine.generate(pairs[:2], max_new_tokens=1)
    times = interleaved([lambda e=e: e.generate(pairs, max_new_tokens=1) for e in engines], args.repeats)
    logits = [[r.logit for r in e.generate(pairs, max_new_tokens=1)] for e in engines]
    tokens = sum(r.num_tokens for r in engines[0].generate(pairs, max_new_tokens=1))
    print(f"checkpoint: {ckpt}  dtype: {loaded.dtype}  threads: {torch.get_num_threads()}  "
          f"{len(pairs)} pairs, {tokens} prompt tokens, best of {args.repeats}")
    for budget, t, xs in zip(budgets, times, logits):
        diff = max(abs(a - b) for a, b in zip(xs, logits[0]))
        print(f"  prefill budget {budget:>6} ({'one pair per forward' if budget == 1 else 'packed batches':>20}): "
              f"{t:6.2f} s  {tokens / t:8.0f} prompt tokens/s   max |logit diff| vs budget {budgets[0]}: {diff:.1e}")


if __name__ == "__main__":
    main()
