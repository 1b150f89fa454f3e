"""A batch job's evidence stage: one `generate` call per bucket vs the bucket submitted to a `Scheduler`.

    python benchmarks/bench_evidence_batch.py [--checkpoint checkpoints/tiny] [--pairs 32] [--slots 16]

What `EngineBackend.generate` (a batch job's evidence actor) did before the scheduler (one
`EvidenceEngine.generate` over the bucket's pairs) and what it does now (the bucket's pairs submitted at once to the
engine's `Scheduler` with `submit_many`, then every result awaited), on the same engine in this process, taking turns within each
repeat (best of `--repeats` kept). `max_new_tokens` is drawn per bucket from 16-128 (seeded): one limit for
the whole bucket, as a batch job's stage has. Prints generated tokens/s of each and whether the texts agree.

Both run in this one process, `generate` on the main thread and the scheduler on its loop thread: two OpenMP
teams, so with as many torch threads as CPUs both contenders run with libgomp's short spin (README, "One
thread runs a replica's model"). The ratio compares like with like; an actor now runs only the second, on
one team (`bench_compute_thread.py --tier evidence` measures that).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engines import QUERY, documents  # noqa: E402

from prism_ray.checkpoints import build_checkpoint  # noqa: E402
from prism_ray.engine import EvidenceEngine, Scheduler  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/tiny")
    ap.add_argument("--preset", default="tiny", help="built at --checkpoint when missing")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    ckpt = Path(args.checkpoint).resolve()
    if not (ckpt / "config.json").is_file():
        build_checkpoint(args.preset, ckpt)
    torch.set_num_threads(args.threads)
    engine = EvidenceEngine(ckpt, dtype="float32", max_batch_size=args.slots)
    scheduler = Scheduler(engine, args.slots, max_queued_pairs=None, torch_threads=args.threads)
    pairs = [(QUERY, d) for d in documents(args.pairs)]
    max_new = random.Random(0).randint(16, 128)
    engine.generate(pairs[:2], max_new_tokens=2)  # warm-up

    def one_call():
        return engine.generate(pairs, max_new_tokens=max_new)

    def submitted():
        return [h.result() for h in scheduler.submit_many(pairs, max_new)]

    best = {"generate": float("inf"), "scheduler": float("inf")}
    out = {}
    for _ in range(args.repeats):
        for name, fn in (("generate", one_call), ("scheduler", submitted)):
            t0 = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    scheduler.close()
    tokens = {k: sum(r.generated_tokens for r in v) for k, v in out.items()}
    same = sum(a.text == b.text for a, b in zip(out["generate"], out["scheduler"]))
    print(f"checkpoint: {ckpt}  float32  threads: {args.threads}  {args.pairs} pairs, {args.slots} slots, "
          f"max_new_tokens {max_new}, best of {args.repeats}")
    for k in best:
        print(f"  {k:9s}: {tokens[k] / best[k]:8.1f} generated tokens/s ({tokens[k]} tokens in {best[k]:.2f} s)")
    print(f"  scheduler / generate = {best['generate'] / best['scheduler']:.2f}x; identical text {same}/{len(pairs)}")


if __name__ == "__main__":
    main()
