"""Many small requests at once: ScoreEngine packing rows of different queries into shared forward passes,
against one engine call per query (what the Scorer tier did before), in one process.

    python benchmarks/bench_packing.py --preset 0.8b --requests 32            # fp32
    python benchmarks/bench_packing.py --preset 0.8b --requests 32 --dtype auto

Each request is a different query (real English, 4-30 words) with 1-5 documents (real English, 20-120
words), the shape of concurrent online traffic. Both contenders score the same pairs with the same
engine settings; the script prints pairs/s, prompt tokens/s, the speed-up and max |score difference|.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_engines import interleaved  # noqa: E402  (this folder is on sys.path when run as a script)

from prism_ray.checkpoints import preset_checkpoint  # noqa: E402
from prism_ray.engine import ScoreEngine, load_model  # noqa: E402
from prism_ray.engine.loading import resolve_dtype  # noqa: E402


def requests(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    import pydoc_data.topics

    texts = [t.split() for t in pydoc_data.topics.topics.values() if len(t.split()) >= 150]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = texts[(i * 7) % len(texts)]
        start = rng.randrange(0, 100)
        query = " ".join(words[start:start + rng.randint(4, 30)])
        docs = []
        for _ in range(rng.randint(1, 5)):
            doc_words = texts[rng.randrange(len(texts))]
            s = rng.randrange(0, len(doc_words) - 130)
            docs.append(" ".join(doc_words[s:s + rng.randint(20, 120)]))
        out.append((query, docs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.8b")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--token-budget", type=int, default=None, help="padded tokens per forward (default: per device)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    ckpt = preset_checkpoint(args.preset, args.checkpoint)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    engine = ScoreEngine(load_model(ckpt, dtype=dtype), token_budget=args.token_budget)
    reqs = requests(args.requests)
    pairs = sum(len(d) for _, d in reqs)
    with torch.inference_mode():
        engine.score(reqs[:2])  # warm-up
        t_one, t_packed = interleaved([lambda: [engine.score([r]) for r in reqs], lambda: engine.score(reqs)],
                                      args.repeats)
        packed = engine.score(reqs)
        one = [engine.score([r])[0] for r in reqs]
    tokens = sum(x.num_tokens for group in packed for x in group)
    diff = max(abs(a.score - b.score) for p, o in zip(packed, one) for a, b in zip(p, o))
    print(f"checkpoint: {ckpt} ({engine.loaded.model.config.num_hidden_layers} layers)  "
          f"dtype: {str(dtype).replace('torch.', '')}  threads: {torch.get_num_threads()}  "
          f"token budget: {engine.token_budget}  best of {args.repeats}")
    print(f"{len(reqs)} requests (different queries), {pairs} pairs, {tokens} prompt tokens")
    print(f"  one engine call per query: {pairs / t_one:8.2f} pairs/s  {tokens / t_one:9.0f} prompt tokens/s")
    print(f"  packed (one call):         {pairs / t_packed:8.2f} pairs/s  {tokens / t_packed:9.0f} prompt tokens/s")
    print(f"  packed / per query = {t_one / t_packed:.2f}x    max |score diff| = {diff:.2e}")


if __name__ == "__main__":
    main()
