"""Float32 projections on CPU through oneDNN, where that is measured to be faster than torch's default.

torch computes a float32 `F.linear` on CPU with MKL's sgemm. On some CPUs MKL takes a slow code path
(on this project's AMD EPYC machines it reaches about half of what oneDNN does on the same shapes:
`benchmarks/bench_linear.py` measured a 3584 x 1024 weight at 8 rows in 0.75 ms against 0.41 ms, and
the 248k-row LM head at 8 rows in 99 ms against 38 ms). torch ships oneDNN too (it already runs every
bf16 matmul), and its linear operator takes the ordinary dense weight, so nothing is copied or
converted. The result is float32 arithmetic, summed in another order: it differs from MKL's by float32
rounding.

`linear_for` times both on a weight shaped like the model's largest projection (once per process and
shape) and, when oneDNN wins by a clear margin, hands the engines' forward (`models/`) oneDNN's function
for its projections. Nothing outside the engines changes: a reference model on the same weights keeps
`F.linear`. `PRISM_RAY_LINEAR=onednn` or `=torch` skips the measurement.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch
import torch.nn.functional as F

log = logging.getLogger("prism_ray")

# oneDNN is chosen only when it is at least this much faster at every probed row count: a choice made
# on noise would flip between processes and with it the last float32 bits of every score.
_MARGIN = 1.15
_PROBE_ROWS = (8, 256)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def decide(timings: list[tuple[int, float, float]]) -> str:
    """"onednn" if oneDNN beat F.linear by `_MARGIN` at every probed row count, else "torch".
    `timings`: (rows, F.linear ms, oneDNN ms)."""
    return "onednn" if timings and all(mkl > _MARGIN * dnn for _, mkl, dnn in timings) else "torch"


@functools.cache
def choose(out_features: int, in_features: int) -> str:
    """"onednn" or "torch" for float32 CPU projections, by `PRISM_RAY_LINEAR` or by timing both on a
    random weight of this shape (a fraction of a second, once per process and shape)."""
    forced = os.environ.get("PRISM_RAY_LINEAR", "auto")
    if forced not in ("auto", "onednn", "torch"):
        raise ValueError(f"PRISM_RAY_LINEAR must be auto, onednn or torch, not {forced!r}")
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return "torch"
    if forced != "auto":
        return forced
    weight = torch.randn(out_features, in_features)
    timings = []
    with torch.inference_mode():
        for rows in _PROBE_ROWS:
            x = torch.randn(rows, in_features)
            try:
                if not torch.allclose(_onednn(x, weight, None), F.linear(x, weight), rtol=1e-4, atol=1e-3):
                    return "torch"
            except RuntimeError:
                return "torch"
            timings.append((rows, _median_ms(lambda x=x: F.linear(x, weight)), _median_ms(lambda x=x: _onednn(x, weight, None))))
    chosen = decide(timings)
    log.info("float32 CPU projections: %s (%s)", chosen,
             ", ".join(f"{rows} rows: F.linear {mkl:.2f} ms, oneDNN {dnn:.2f} ms" for rows, mkl, dnn in timings))
    return chosen


def linear_for(probe_shape: tuple[int, int], dtype: torch.dtype, device: torch.device):
    """The projection function for a model of this dtype and device: oneDNN's for float32 on a CPU where
    `choose` measured it faster on the model's largest layer shape, torch's `F.linear` otherwise (bf16 matmuls
    already run in oneDNN). Returns (name, function)."""
    if dtype == torch.float32 and device.type == "cpu" and choose(*probe_shape) == "onednn":
        return "onednn", _onednn
    return "torch", F.linear
