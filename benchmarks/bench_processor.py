"""The Ray Data processor (`prism_ray.data`) with 1 and 2 scorer actors against ScoreEngine in-process,
on the same pairs, in one run.

    python benchmarks/bench_processor.py                  # 24 queries x 20 documents = 480 pairs
    python benchmarks/bench_processor.py --queries 8      # a shorter run

The rows are `jobs/example_data.py`'s (real English passages), one wide row per query, through
`ray.data.from_items`; the checkpoint is the `bench` preset (real 0.8B widths, 4 layers; built on first
use), float32. Every contender uses `--threads` torch threads in all: ScoreEngine in this process, one
actor with all of them, or two actors with half each. A processor's time is the whole pipeline until
its last row is taken: planning, starting the actors and loading the model, scoring. Prints its figures.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_batch import bench_setup  # noqa: E402

from prism_ray.data import build_processor  # noqa: E402
from prism_ray.engine import ScoreEngine, load_model  # noqa: E402


def main() -> None:
    args, ckpt, by_query = bench_setup(__doc__, queries=24)
    items = [{"query_id": qid, "query": query, "documents": docs} for qid, (query, docs) in by_query.items()]
    pairs = args.queries * args.docs

    torch.set_num_threads(args.threads)
    engine = ScoreEngine(load_model(ckpt, dtype="float32"))
    t0 = time.perf_counter()
    expected = {it["query_id"]: [r.score for r in engine.score([(it["query"], it["documents"])])[0]] for it in items}
    in_process = time.perf_counter() - t0
    print(f"ScoreEngine in-process: {pairs} pairs in {in_process:.1f} s = {pairs / in_process:.2f} pairs/s "
          f"({args.threads} threads)", flush=True)
    del engine

    import ray

    ray.init(num_cpus=args.threads, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    for actors in (1, 2):
        threads = max(args.threads // actors, 1)
        model = {"name": "bench", "model": str(ckpt), "dtype": "float32",
                 "scorer": {"ray_actor_options": {"num_cpus": args.threads / actors}, "torch_threads": threads}}
        processor = build_processor({"model": "bench", "models": [model], "concurrency": actors, "batch_size": 4})
        t0 = time.perf_counter()
        out = processor(ray.data.from_items(items)).take_all()
        took = time.perf_counter() - t0
        diff = max(abs(a - b) for r in out for a, b in zip(r["scores"], expected[r["query_id"]]))
        assert len(out) == len(items) and all(r["error"] is None for r in out)
        print(f"processor, {actors} actor{'s' if actors > 1 else ' '} x {threads} thread{'s' if threads > 1 else ''}: "
              f"{pairs} pairs in {took:.1f} s = {pairs / took:.2f} pairs/s = {in_process / took:.0%} of in-process "
              f"(max |score diff| {diff:.1e})", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
