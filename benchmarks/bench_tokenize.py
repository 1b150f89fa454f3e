"""Host-side tokenization per request: one document at a time vs one batch (the tokenizers library's
threads), on the real Qwen3.5 tokenizer, for the shapes the device check times (1 x 20, 16 x 20, 64 x 100).

    python benchmarks/bench_tokenize.py [--preset tiny]

On a GPU replica this is time the device waits for: at the issue's 600k prompt tokens/s target, 16 x 20
(~120k tokens) is a 0.2 s forward. Prints its own figures; both ways give the same ids (checked).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engines import documents  # noqa: E402

from prism_ray.checkpoints import preset_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help="any preset: they share the real tokenizer")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ckpt = preset_checkpoint(args.preset)
    from transformers import AutoTokenizer

    from prism_ray.prompt import PrismPromptTokenizer

    prompts = PrismPromptTokenizer(AutoTokenizer.from_pretrained(str(ckpt)))
    pool = documents(100)
    print(f"cores: {os.cpu_count()}  documents of {min(len(d.split()) for d in pool)}-"
          f"{max(len(d.split()) for d in pool)} words")
    for queries, per_query in ((1, 20), (16, 20), (64, 100)):
        groups = [(f"query number {q}: how do exceptions propagate?", pool[:per_query]) for q in range(queries)]

        def one_by_one(groups=groups):  # as the engines did: the prefix once per query, then each document
            out = []
            for q, docs in groups:
                prefix = prompts.prefix(q)
                out.append([prompts.encode(q, d, prefix=prefix) for d in docs])
            return out

        def batched(groups=groups):
            return [prompts.encode_documents(q, docs) for q, docs in groups]

        assert one_by_one() == batched()
        times = {}
        for name, fn in (("one by one", one_by_one), ("batched", batched)):
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            times[name] = best
        tokens = sum(p.num_tokens for group in batched() for p in group)
        print(f"  {queries:3d} x {per_query:3d} ({tokens:,} prompt tokens): one by one {1000 * times['one by one']:7.1f} ms"
              f"   batched {1000 * times['batched']:7.1f} ms   ({times['one by one'] / times['batched']:.2f}x)")


if __name__ == "__main__":
    main()
