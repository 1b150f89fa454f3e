"""The engines' kernel choices side by side on one loaded model, in one process (CPU or CUDA).

    python benchmarks/bench_kernels.py --preset 0.8b                        # every choice this device has
    python benchmarks/bench_kernels.py --preset 0.8b --dtype auto --queries 4 --docs 20

Each choice (`prism_ray.engine.kernels.CHOICES`: prefill attention `sdpa` (per row) / `padded`, the gated delta rule
`prism` / `fla`), and each ScoreEngine `prefix_min_docs` policy given (`--prefix-min-docs 1,1000000`: a query's
prefix as a forward of its own, or run inside its rows), runs ScoreEngine on the same (query, documents) groups
over the same weights (`loading.with_kernels`), the contenders taking turns within each round; printed: prompt
tokens/s (best of the rounds) and each one's max |score difference| from the first. `device_check.py` runs the
same comparison on a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism_ray.checkpoints import preset_checkpoint  # noqa: E402
from prism_ray.engine import ScoreEngine, fla_ops, load_model  # noqa: E402
from prism_ray.engine.kernels import CHOICES  # noqa: E402
from prism_ray.engine.loading import with_kernels  # noqa: E402


def texts(n: int, lo: int, hi: int, offset: int = 0) -> list[str]:
    import pydoc_data.topics

    topics = [t.split() for t in pydoc_data.topics.topics.values() if len(t.split()) >= hi]
    return [" ".join(topics[(offset + i * 7) % len(topics)][: lo + (i * 37) % (hi - lo + 1)]) for i in range(n)]


def workload(queries: int, docs: int) -> list[tuple[str, list[str]]]:
    """Queries of 6-23 words, each with `docs` documents of 40-160 words of Python's bundled documentation."""
    return [(" ".join(texts(1, 6, 24, offset=q)[0].split()[: 6 + q % 18]), texts(docs, 40, 160, offset=q * 3))
            for q in range(queries)]


def choices_here(device: torch.device) -> list[dict[str, str]]:
    """Every combination of kernels this device can run."""
    options = dict(CHOICES)
    if not (device.type == "cuda" and fla_ops.available()):
        options = {op: tuple(n for n in names if n != "fla") for op, names in options.items()}
    return [dict(zip(options, combo)) for combo in itertools.product(*options.values())]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def contenders(loaded, choices: list[dict[str, str]], token_budget: int | None = None,
               prefix_min_docs: tuple[int, ...] = (1,)) -> list[tuple[str, object]]:
    """(name, engine factory) for each kernel choice, and for each `prefix_min_docs` policy."""
    out = []
    for choice in choices:
        for docs in prefix_min_docs:
            name = ", ".join(f"{k}={v}" for k, v in choice.items()) + (f", prefix_min_docs={docs}" if len(prefix_min_docs) > 1 else "")
            out.append((name, lambda choice=choice, docs=docs: ScoreEngine(with_kernels(loaded, choice), token_budget=token_budget,
                                                                            prefix_min_docs=docs)))
    return out


def compare(loaded, groups, engines: list[tuple[str, object]], repeats: int) -> list[dict]:
    """One row per contender (name, engine factory): prompt tokens/s (best of `repeats` rounds after one
    untimed call), the max |score difference| from the first, or the error that stopped it."""
    built, rows = [], []
    for name, make in engines:
        try:
            engine = make()
            engine.score(groups)  # compile, autotune, first primitives
            built.append((name, engine))
        except Exception as exc:  # noqa: BLE001 - a choice that cannot run here is reported, not fatal
            rows.append({"choice": name, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:160]})
    tokens = sum(built[0][1].prompts.encode(q, d).num_tokens for q, ds in groups for d in ds) if built else 0
    best = {name: float("inf") for name, _ in built}
    scores = {}
    for _ in range(repeats):
        for name, engine in built:
            _sync(loaded.device)
            t0 = time.perf_counter()
            scores[name] = [r.score for g in engine.score(groups) for r in g]
            _sync(loaded.device)
            best[name] = min(best[name], time.perf_counter() - t0)
    first = scores[built[0][0]] if built else []
    for name, _ in built:
        diff = max(abs(a - b) for a, b in zip(scores[name], first))
        rows.append({"choice": name, "tokens_per_s": tokens / best[name], "seconds": best[name], "max_diff": diff})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.8b")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--queries", type=int, default=1)
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--token-budget", type=int, default=None)
    ap.add_argument("--prefix-min-docs", default="1", help="comma-separated ScoreEngine prefix_min_docs policies to compare")
    args = ap.parse_args()
    ckpt = Path(args.checkpoint) if args.checkpoint else preset_checkpoint(args.preset)
    loaded = load_model(ckpt, dtype=args.dtype, device=args.device)
    groups = workload(args.queries, args.docs)
    print(f"{ckpt} on {loaded.device} ({loaded.dtype}), {args.queries} x {args.docs}, threads {torch.get_num_threads()}, "
          f"best of {args.repeats}", flush=True)
    print("| kernels | prompt tokens/s | seconds | max abs score diff vs first |\n|---|---|---|---|")
    policies = tuple(int(x) for x in args.prefix_min_docs.split(","))
    for row in compare(loaded, groups, contenders(loaded, choices_here(loaded.device), args.token_budget, policies), args.repeats):
        if "error" in row:
            print(f"| {row['choice']} | failed: {row['error']} | | |")
        else:
            print(f"| {row['choice']} | {row['tokens_per_s']:,.0f} | {row['seconds']:.3f} | {row['max_diff']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
