"""Resident memory of a ScoreEngine over many calls, in-process and without Ray: is a replica's growth the engine's?

    python benchmarks/engine_memory.py [--calls 2400] [--checkpoint checkpoints/tiny]

The soak benchmark's plain-request workload (5-20 documents of 20-140 words, four queries), one engine
call each, on one thread; prints VmRSS every 300 calls, at the end, and after `malloc_trim(0)`
(what glibc kept in its free lists rather than what is still referenced).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak_serve import QUERIES, _documents  # noqa: E402

from prism_ray.checkpoints import build_checkpoint  # noqa: E402
from prism_ray.engine import ScoreEngine, load_model  # noqa: E402


def rss_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/tiny")
    ap.add_argument("--calls", type=int, default=2400)
    args = ap.parse_args()
    if not (Path(args.checkpoint) / "config.json").is_file():
        build_checkpoint("tiny", args.checkpoint)
    torch.set_num_threads(1)
    engine = ScoreEngine(load_model(args.checkpoint, dtype="float32"), token_budget=1024)
    started = time.monotonic()
    for n in range(args.calls):
        engine.score([(QUERIES[n % len(QUERIES)], _documents(5 + n % 16, n))])
        if n % 300 == 0:
            print(f"call {n:5d}: {rss_mib()} MiB ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"after {args.calls} calls: {rss_mib()} MiB")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(f"after malloc_trim(0): {rss_mib()} MiB")


if __name__ == "__main__":
    main()
