"""How many torch operations one ScoreEngine call dispatches, and from which lines of the engine.

    python benchmarks/count_ops.py --preset 0.8b                 # 1 query x 2 short documents, bf16
    python benchmarks/count_ops.py --preset 0.8b --docs 20 --top 15

On a GPU a scoring call of a few rows is bound by the host's launches (`device_check.sh` v4: the GPU busy
15 % of a 1 x 20 call), so the count of dispatched operations is the figure to bring down there, and it can be
taken on any machine. Counted under a `TorchDispatchMode` (every aten operation, views included), by the
innermost `prism_ray` line that issued it. The project's CPU delta rule (`delta_rule.py`) is counted apart:
on a GPU fla's kernels run instead.
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import texts  # noqa: E402  (benchmarks/, the script's folder)

from prism_ray.checkpoints import preset_checkpoint  # noqa: E402
from prism_ray.engine import ScoreEngine, load_model  # noqa: E402


class Counter(TorchDispatchMode):
    """Counts each dispatched operation by the innermost prism_ray source line on the stack."""

    def __init__(self):
        super().__init__()
        self.by_line: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frames = [f for f in traceback.extract_stack() if "prism_ray" in f.filename]
        self.by_line[f"{frames[-1].filename.split('prism_ray/')[-1]}:{frames[-1].lineno}" if frames else "(outside)"] += 1
        return func(*args, **(kwargs or {}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--queries", type=int, default=1)
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    loaded = load_model(preset_checkpoint(args.preset), dtype=args.dtype, kernels={"attention": "padded"})
    engine = ScoreEngine(loaded, prefix_min_docs=1 << 30)  # the GPU's policy at these sizes: prefixes in rows
    groups = [(" ".join(texts(1, 6, 12, offset=q)[0].split()[:8]), texts(args.docs, 20, 40, offset=q)) for q in range(args.queries)]
    engine.score(groups)
    counter = Counter()
    with counter, torch.inference_mode():
        engine.score(groups)
    delta = sum(n for line, n in counter.by_line.items() if line.startswith("engine/delta_rule.py"))
    total = sum(counter.by_line.values())
    print(f"{args.preset} ({len(loaded.net.layers)} layers, {args.dtype}), {args.queries} x {args.docs}: {total - delta} operations "
          f"outside the CPU delta rule, {delta} in it")
    for line, n in counter.by_line.most_common():
        if not line.startswith("engine/delta_rule.py") and args.top > 0:
            print(f"  {n:6d}  {line}")
            args.top -= 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
