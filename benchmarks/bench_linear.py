"""float32 projections on CPU: torch's `F.linear` (MKL sgemm) against oneDNN's linear on the same dense weight.

    python benchmarks/bench_linear.py            # the 0.8B model's projection shapes and its LM head

What `prism_ray/engine/linear.py` decides on, in the open: per weight shape and row count, the median time
of each (interleaved), and the largest difference between the two results relative to the output's
scale. Random weights; torch's thread count as set (2 here). Prints its own figures.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

# (out, in) of the 0.8B model's MLP up/down projections and its LM head (vocabulary x hidden).
SHAPES = [(3584, 1024), (1024, 3584), (248320, 1024)]
ROWS = [1, 8, 32, 256, 1024]


def onednn(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def median_ms(fns, repeats: int) -> list[float]:
    """Median milliseconds of each function, the functions taking turns (this machine's speed drifts)."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, own in zip(fns, times):
            start = time.perf_counter()
            fn()
            own.append(time.perf_counter() - start)
    return [1e3 * sorted(t)[len(t) // 2] for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, median of {args.repeats}")
    with torch.inference_mode():
        for out_f, in_f in SHAPES:
            w = torch.randn(out_f, in_f)
            for rows in ROWS:
                if out_f > 100_000 and rows > 32:
                    continue  # the LM head only ever sees the decode batch
                x = torch.randn(rows, in_f)
                repeats = max(3, args.repeats // 3) if out_f > 100_000 else args.repeats
                mkl, dnn = median_ms([lambda x=x, w=w: F.linear(x, w), lambda x=x, w=w: onednn(x, w)], repeats)
                ref = F.linear(x, w)
                diff = ((onednn(x, w) - ref).abs().max() / ref.abs().max()).item()
                print(f"  {out_f:>6} x {in_f:<5} {rows:>5} rows: F.linear {mkl:8.2f} ms   oneDNN {dnn:8.2f} ms   "
                      f"= {mkl / dnn:4.2f}x   max |diff| / max |out| {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
