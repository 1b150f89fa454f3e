"""Batch job throughput against ScoreEngine in-process, on the same pairs, in one run.

    python benchmarks/bench_batch.py                  # 100 queries x 20 documents = 2,000 pairs
    python benchmarks/bench_batch.py --queries 30     # a shorter run

The dataset is written by `jobs/example_data.py` (real English passages from `pydoc_data.topics`);
the checkpoint is the `bench` preset (real 0.8B widths, 4 layers; built on first use), float32. Both
contenders compute with the same torch thread count: ScoreEngine in this process, and the job's one
scorer actor on a local Ray cluster. The job's time is the whole `run_batch` call: planning, reading,
the bucket shuffle, starting the actor and loading the model, scoring, writing. Prints its own figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.example_data import example_pairs, write_example  # noqa: E402
from prism_ray.batch import BatchConfig, run_batch  # noqa: E402
from prism_ray.checkpoints import build_checkpoint  # noqa: E402
from prism_ray.engine import ScoreEngine, load_model  # noqa: E402


def bench_setup(doc: str, queries: int):
    """The batch benchmarks' flags, the `bench` checkpoint (built on first use) and the example rows as
    query_id -> (query, documents)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--queries", type=int, default=queries)
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "bench"))
    args = ap.parse_args()
    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").is_file():
        build_checkpoint("bench", ckpt)
    rows = example_pairs(args.queries, args.docs)
    groups: dict[str, tuple[str, list[str]]] = {}
    for qid, query, text in zip(rows["query_id"], rows["query"], rows["text"]):
        groups.setdefault(qid, (query, []))[1].append(text)
    return args, ckpt, groups


def main() -> None:
    args, ckpt, groups = bench_setup(__doc__, queries=100)
    torch.set_num_threads(args.threads)
    pairs = args.queries * args.docs

    engine = ScoreEngine(load_model(ckpt, dtype="float32"))
    t0 = time.perf_counter()
    for query, docs in groups.values():
        engine.score([(query, docs)])
    in_process = time.perf_counter() - t0
    print(f"ScoreEngine in-process: {pairs} pairs in {in_process:.1f} s = {pairs / in_process:.2f} pairs/s "
          f"({args.threads} threads)", flush=True)
    del engine

    import ray

    ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        inp = write_example(Path(tmp) / "in", args.queries, args.docs, files=4)
        model = {"name": "bench", "model": str(ckpt), "dtype": "float32",
                 "scorer": {"ray_actor_options": {"num_cpus": 1}, "num_replicas": 1, "torch_threads": args.threads}}
        cfg = BatchConfig(input=str(inp), output=str(Path(tmp) / "out"), model="bench", models=[model])
        t0 = time.perf_counter()
        summary = run_batch(cfg, progress=False)
        job = time.perf_counter() - t0
    ray.shutdown()
    assert summary.pairs == pairs and summary.failed == 0, summary
    print(f"batch job, 1 actor:     {pairs} pairs in {job:.1f} s = {pairs / job:.2f} pairs/s "
          f"({summary.files} files, {summary.tokens / job:.0f} tokens/s)")
    print(f"job / in-process throughput: {in_process / job:.0%}")


if __name__ == "__main__":
    main()
