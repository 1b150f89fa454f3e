"""What an idle Serve cluster costs the compute beside it, on a small machine: the in-process engine with Ray
down, with the bench app up and idle, and down again, in one run; and what the cluster's processes do while
idle (CPU and thread wakeups per second, from /proc).

    python benchmarks/bench_cluster_idle.py [--quiet] [--requests 6]

`--quiet` starts the cluster with Ray's and Serve's periodic work made rarer (the variables below): Serve's
control loop every 1 s instead of 0.1 s, cached metrics exported every 1 s instead of 0.1 s, Ray's metrics
off, the raylet's resource reports every 1 s. Linux only (/proc). Prints its own figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engines import documents  # noqa: E402
from bench_serve import QUERIES, start_local_serve  # noqa: E402

from prism_ray.checkpoints import build_checkpoint  # noqa: E402
from prism_ray.engine import ScoreEngine, load_model  # noqa: E402

QUIET = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
         "RAY_enable_metrics_collection": "0", "RAY_raylet_report_resources_period_milliseconds": "1000"}


def processes() -> dict[int, tuple[str, int, int]]:
    """Every other process: (its command line's start, CPU ticks, context switches of all its threads)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:60]
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            switches = 0
            for tid in os.listdir(f"/proc/{pid}/task"):
                status = open(f"/proc/{pid}/task/{tid}/status").read()
                switches += sum(int(status.split(f"{kind}ctxt_switches:")[1].split()[0])
                                for kind in ("\nvoluntary_", "nonvoluntary_"))
        except (OSError, IndexError):
            continue
        out[int(pid)] = (cmd, int(fields[11]) + int(fields[12]), switches)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/bench")
    ap.add_argument("--requests", type=int, default=6, help="20-document calls per phase (median)")
    ap.add_argument("--idle-seconds", type=float, default=15)
    ap.add_argument("--quiet", action="store_true", help="Ray's and Serve's periodic work made rarer (see above)")
    args = ap.parse_args()
    ckpt = Path(args.checkpoint).resolve()
    if not (ckpt / "config.json").is_file():
        build_checkpoint("bench", ckpt)
    docs = documents(20)
    engine = ScoreEngine(load_model(ckpt, dtype="float32"))
    engine.score_pairs(QUERIES[0], docs)

    def median_call() -> float:
        times = []
        for i in range(args.requests):
            t0 = time.perf_counter()
            engine.score_pairs(QUERIES[i % len(QUERIES)], docs)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    import ray
    from ray import serve

    from deployments.app import build_app

    down = median_call()
    if args.quiet:
        os.environ.update(QUIET)
    start_local_serve()
    config = {"models": [{"name": "bench", "model": str(ckpt), "dtype": "float32", "evidence": None,
                          "scorer": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}, "torch_threads": 2,
                                     "max_batch_tokens": 1024}}]}
    try:
        serve.run(build_app(config), name="bench", route_prefix="/")
        time.sleep(5)
        before, t0 = processes(), time.perf_counter()
        time.sleep(args.idle_seconds)
        after, seconds = processes(), time.perf_counter() - t0
        up = median_call()
    finally:
        serve.shutdown()
        ray.shutdown()
    down_again = median_call()

    rows = sorted(((100 * (ticks - before[pid][1]) / os.sysconf("SC_CLK_TCK") / seconds,
                    (switches - before[pid][2]) / seconds, cmd)
                   for pid, (cmd, ticks, switches) in after.items() if pid in before), reverse=True)
    print(f"Serve cluster idle for {seconds:.0f} s ({'quiet: ' + ', '.join(QUIET) if args.quiet else 'defaults'}); "
          f"the busiest processes (CPU % of one core, thread wakeups per second):")
    for cpu, wakeups, cmd in rows[:8]:
        print(f"  {cpu:5.1f} %  {wakeups:6.0f}/s  {cmd}")
    print(f"  all other processes: {sum(r[0] for r in rows):.1f} % of one core, {sum(r[1] for r in rows):.0f} "
          f"wakeups/s")
    print(f"in-process engine, 20-document call (median of {args.requests}, torch threads "
          f"{torch.get_num_threads()}): Ray down {down:.3f} s, cluster up and idle {up:.3f} s, Ray "
          f"down again {down_again:.3f} s: up / down = {up / ((down + down_again) / 2):.3f}")


if __name__ == "__main__":
    main()
