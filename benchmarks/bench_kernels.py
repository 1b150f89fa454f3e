"""The engines' kernel choices side by side on one loaded model, in one process (CPU or CUDA).

    python benchmarks/bench_kernels.py --preset 0.8b                        # every choice this device has
    python benchmarks/bench_kernels.py --preset 0.8b --dtype auto --queries 4 --docs 20

Each choice (`prism_ray.engine.kernels.CHOICES`: prefill attention `rows` / `padded`, the gated delta rule
`prism` / `fla`) runs ScoreEngine on the same (query, documents) groups over the same weights
(`loading.with_kernels`), the contenders taking turns within each round; printed: prompt tokens/s (best of
the rounds) and each choice's max |score difference| from the first. `device_check.py` runs the same
comparison on a GPU.
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
        options["gated_delta_rule"] = tuple(n for n in options["gated_delta_rule"] if n != "fla")
    return [dict(zip(options, combo)) for combo in itertools.product(*options.values())]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(loaded, groups, choices: list[dict[str, str]], repeats: int, token_budget: int | None = None) -> list[dict]:
    """One row per choice: its name, prompt tokens/s (best of `repeats` rounds after one untimed call), the
    max |score difference| from the first choice, or the error that stopped it."""
    engines, rows = [], []
    for choice in choices:
        name = ", ".join(f"{k}={v}" for k, v in choice.items())
        try:
            engine = ScoreEngine(with_kernels(loaded, choice), token_budget=token_budget)
            engine.score(groups)  # compile, autotune, first primitives
            engines.append((name, engine))
        except Exception as exc:  # noqa: BLE001 - a choice that cannot run here is reported, not fatal
            rows.append({"choice": name, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:160]})
    tokens = sum(engines[0][1].prompts.encode(q, d).num_tokens for q, ds in groups for d in ds) if engines else 0
    best = {name: float("inf") for name, _ in engines}
    scores = {}
    for _ in range(repeats):
        for name, engine in engines:
            _sync(loaded.device)
            t0 = time.perf_counter()
            scores[name] = [r.score for g in engine.score(groups) for r in g]
            _sync(loaded.device)
            best[name] = min(best[name], time.perf_counter() - t0)
    first = scores[engines[0][0]] if engines else []
    for name, _ in engines:
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
    args = ap.parse_args()
    ckpt = Path(args.checkpoint) if args.checkpoint else preset_checkpoint(args.preset)
    loaded = load_model(ckpt, dtype=args.dtype, device=args.device)
    groups = workload(args.queries, args.docs)
    print(f"{ckpt} on {loaded.device} ({loaded.dtype}), {args.queries} x {args.docs}, threads {torch.get_num_threads()}, "
          f"best of {args.repeats}", flush=True)
    print("| kernels | prompt tokens/s | seconds | max abs score diff vs first |\n|---|---|---|---|")
    for row in compare(loaded, groups, choices_here(loaded.device), args.repeats, args.token_budget):
        if "error" in row:
            print(f"| {row['choice']} | failed: {row['error']} | | |")
        else:
            print(f"| {row['choice']} | {row['tokens_per_s']:,.0f} | {row['seconds']:.3f} | {row['max_diff']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
