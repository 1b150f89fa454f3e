"""For benchmarks only: every float32 CPU `F.linear` in this process swapped for oneDNN's within a block.

The engines may run their float32 projections in oneDNN (`prism_ray/engine/linear.py`, chosen at load); this
lets a reference path (transformers' forward, path A) be timed on that same GEMM library, so the library's
gain is told apart from the engines'. It rebinds a torch function process-wide, which is why it lives here
and never in `prism_ray`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def f_linear_on_onednn():
    original = F.linear

    def linear(x, weight, bias=None):
        if x.dtype == torch.float32 and x.device.type == "cpu" and weight.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return original(x, weight, bias)

    F.linear = linear
    try:
        yield
    finally:
        F.linear = original
