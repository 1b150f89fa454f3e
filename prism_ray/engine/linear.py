"""Float32 projections on CPU through oneDNN, where that is measured to be faster than torch's default.

torch computes a float32 `F.linear` on CPU with MKL's sgemm. On some CPUs MKL takes a slow code path
(on this project's AMD EPYC machines it reaches about half of what oneDNN does on the same shapes:
`benchmarks/bench_linear.py` measured a 3584 x 1024 weight at 8 rows in 0.75 ms against 0.41 ms, and
the 248k-row LM head at 8 rows in 99 ms against 38 ms). torch ships oneDNN too (it already runs every
bf16 matmul), and its linear operator takes the ordinary dense weight, so nothing is copied or
converted. The result is float32 arithmetic, summed in another order: it differs from MKL's by float32
rounding.

`install(model)` times both on a weight shaped like the model's largest projection (once per process
and shape), and when oneDNN wins by a clear margin, makes the model's `nn.Linear` layers use it for
float32 CPU input, only inside `scope.engine_kernels()` (a reference model on the same weights keeps
`F.linear`). `PRISM_RAY_LINEAR=onednn` or `=torch` skips the measurement.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import torch
import torch.nn.functional as F

from prism_ray.engine import scope

log = logging.getLogger("prism_ray")

# oneDNN is chosen only when it is at least this much faster at every probed row count: a choice made
# on noise would flip between processes and with it the last float32 bits of every score.
_MARGIN = 1.15
_PROBE_ROWS = (8, 256)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class EngineLinear(torch.nn.Linear):
    """An `nn.Linear` (same parameters, same state dict) whose float32 CPU forward runs in oneDNN inside
    the engines' scope. The class of an existing layer is switched to this one; no weight is touched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if scope.active() and x.dtype == torch.float32 and self.weight.dtype == torch.float32 and x.device.type == "cpu":
            return _onednn(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


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


def install(model: torch.nn.Module) -> bool:
    """Switch the model's linear layers to `EngineLinear` if oneDNN is the faster float32 path here; returns
    whether it did. Only for a float32 model on CPU (bf16 matmuls already run in oneDNN)."""
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear]
    if not layers or layers[0].weight.dtype != torch.float32 or layers[0].weight.device.type != "cpu":
        return False
    # The largest projection of a decoder layer; the LM head (a vocabulary of rows) is not typical of them.
    probe = max(layers, key=lambda m: m.weight.numel() if m.weight.shape[0] < 65536 else 0)
    if choose(*probe.weight.shape) != "onednn":
        return False
    for layer in layers:
        layer.__class__ = EngineLinear
    return True


def uses_onednn(model: torch.nn.Module) -> bool:
    """Whether `install` switched this model's layers to oneDNN."""
    return any(type(m) is EngineLinear for m in model.modules())


@contextlib.contextmanager
def f_linear_on_onednn():
    """For benchmarks: within the block every float32 CPU `F.linear` in this process (a reference model's
    too) runs in oneDNN, so that a reference path can be timed on the engines' GEMM library and the gain
    of the library told apart from the rest. Not for serving: it swaps a torch function process-wide."""
    original = F.linear

    def linear(x, weight, bias=None):
        if x.dtype == torch.float32 and x.device.type == "cpu" and weight.dtype == torch.float32:
            return _onednn(x, weight, bias)
        return original(x, weight, bias)

    F.linear = linear
    try:
        yield
    finally:
        F.linear = original
