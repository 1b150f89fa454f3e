"""Where a replica loads its engine, in one run: the engine loaded and run on one thread vs loaded on the main
thread and run on another (the scorer's compute thread, the evidence scheduler's loop thread), as the tiers
did before, on a small machine.

    python benchmarks/bench_compute_thread.py [--tier scorer|evidence] [--checkpoint checkpoints/bench]
        [--calls 4] [--rounds 2] [--neighbour 0.12]

libgomp (torch's OpenMP on Linux) keeps one team of threads per thread that starts parallel work. Once its
teams hold more threads than the process has CPUs, it cuts the spin a waiting thread does before it sleeps
to almost nothing, so every parallel region ends in futex sleeps and wakeups. A team is never given back,
so each setting runs in a fresh process, the settings in turn, `--rounds` times:

- `main`: load and run on the main thread (an in-process user; `EvidenceEngine.generate` for evidence);
- `loaded on main, run on the compute thread`: the tiers before (`build_engine` in the constructor, then
  the scorer's engine calls on `deployments.threads.ComputeThread`, or a `Scheduler(engine)`);
- `loaded and run on the compute thread`: the tiers now (`ComputeThread.call(build_engine, ...)`, or
  `Scheduler(build)`, which builds the engine on its loop thread).

A sleeping torch thread costs little on an otherwise idle machine: its core is free when it is woken. Beside
other processes its core may be taken, and the whole team waits for it. `--neighbour F` runs, for the whole
benchmark, a process that wakes every 0.5 ms and spins for F of that time (0.12: about what an idle Serve
cluster uses here, 12 % of one core in ~2,000 wakeups/s, `bench_cluster_idle.py`).

A scorer call scores 20 documents of 60-180 words (`bench_engines.documents`); an evidence call generates 48
tokens for each of 8 such documents at once. float32. Prints per setting the median seconds per call, and
its busiest threads' voluntary context switches per second (sleeps; about 0 when the team spins as it
should). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SETTINGS = {"main": "main thread",
            "split": "loaded on main, run on the compute thread",
            "compute": "loaded and run on the compute thread"}  # evidence: the scheduler's loop thread
EVIDENCE_PAIRS, EVIDENCE_TOKENS = 8, 48  # --tier evidence: a call generates this many tokens for each of the pairs
QUERIES = ["How do I iterate over the items of a sequence?", "What does the with statement do?",
           "How are exceptions raised and handled?", "What is a generator expression?"]


def thread_stats() -> dict[int, tuple[int, int]]:
    """Per thread of this process: (CPU ticks, voluntary context switches)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        stat = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        status = open(f"/proc/self/task/{tid}/status").read()
        out[int(tid)] = (int(stat[11]) + int(stat[12]), int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0]))
    return out


def child(setting: str, tier: str, checkpoint: str, calls: int) -> None:
    import functools

    import torch
    from bench_engines import documents

    from deployments.threads import ComputeThread
    from prism_ray.config import ModelConfig
    from prism_ray.engine import Scheduler
    from prism_ray.factory import build_engine

    model = ModelConfig.model_validate({"name": "bench", "model": checkpoint, "dtype": "float32",
                                        "evidence": {"max_active_pairs": EVIDENCE_PAIRS}})
    build = functools.partial(build_engine, model, tier)
    if tier == "scorer":
        docs = documents(20)
        compute = ComputeThread(torch.get_num_threads(), wedged_after_s=600)
        engine = compute.call(build) if setting == "compute" else build()
        run = (lambda fn, *a: fn(*a)) if setting == "main" else compute.call

        def work(i):
            run(engine.score_pairs, QUERIES[i % len(QUERIES)], docs)
    else:
        pairs = [(QUERIES[0], d) for d in documents(EVIDENCE_PAIRS)]
        if setting == "main":
            engine = build()

            def work(i):
                engine.generate(pairs, max_new_tokens=EVIDENCE_TOKENS)
        else:
            scheduler = Scheduler(build if setting == "compute" else build(), EVIDENCE_PAIRS, max_queued_pairs=None)

            def work(i):
                [h.result() for h in scheduler.submit_many(pairs, EVIDENCE_TOKENS)]
    work(0)
    before, times, t0 = thread_stats(), [], time.perf_counter()
    for i in range(calls):
        t = time.perf_counter()
        work(i)
        times.append(time.perf_counter() - t)
    seconds, after = time.perf_counter() - t0, thread_stats()
    busiest = sorted((after[t][0] - before[t][0], (after[t][1] - before[t][1]) / seconds) for t in after if t in before)
    print(json.dumps({"median_s": statistics.median(times), "threads": torch.get_num_threads(),
                      "sleeps_per_s": [round(s) for _, s in busiest[-torch.get_num_threads():]]}))


def neighbour(share: float) -> None:
    """Spin `share` of every 0.5 ms and sleep the rest, until killed."""
    period = 0.0005
    while True:
        t = time.perf_counter()
        while time.perf_counter() - t < share * period:
            pass
        time.sleep(period * (1 - share))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/bench")
    ap.add_argument("--tier", choices=("scorer", "evidence"), default="scorer")
    ap.add_argument("--calls", type=int, default=4, help="calls per process")
    ap.add_argument("--rounds", type=int, default=2, help="processes per setting, the settings in turn")
    ap.add_argument("--neighbour", type=float, default=0.0,
                    help="share of one core a waking neighbour process spins (see above); 0: none")
    ap.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    ap.add_argument("--spin", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    ckpt = Path(args.checkpoint).resolve()
    if args.spin is not None:
        return neighbour(args.spin)
    if args.child:
        return child(args.child, args.tier, str(ckpt), args.calls)
    if not (ckpt / "config.json").is_file():
        from prism_ray.checkpoints import build_checkpoint

        build_checkpoint("bench", ckpt)
    results: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    other = subprocess.Popen([sys.executable, __file__, "--spin", str(args.neighbour)]) if args.neighbour else None
    try:
        for _ in range(args.rounds):
            for setting in SETTINGS:
                out = subprocess.run([sys.executable, __file__, "--checkpoint", str(ckpt), "--calls",
                                      str(args.calls), "--tier", args.tier, "--child", setting], capture_output=True, text=True, check=True)
                results[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        if other:
            other.kill()
    base = statistics.median(r["median_s"] for r in results["main"])
    call = "20-document call" if args.tier == "scorer" else f"call of {EVIDENCE_PAIRS} pairs x {EVIDENCE_TOKENS} tokens"
    print(f"{ckpt.name}, {args.tier} engine, float32, torch threads {results['main'][0]['threads']}, {os.cpu_count()} "
          f"CPUs, neighbour {f'spinning {args.neighbour:.0%} of one core' if args.neighbour else 'none'}; median "
          f"seconds per {call}, one process per round ({args.calls} calls each):")
    for setting, label in SETTINGS.items():
        rows = results[setting]
        per_round = " / ".join(f"{r['median_s']:.3f}" for r in rows)
        sleeps = " / ".join(",".join(map(str, r["sleeps_per_s"])) for r in rows)
        print(f"  {label:43s} {per_round} s  ({statistics.median(r['median_s'] for r in rows) / base:.3f}x main);"
              f"  torch threads' sleeps/s: {sleeps}")


if __name__ == "__main__":
    main()
