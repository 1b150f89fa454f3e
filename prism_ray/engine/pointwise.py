"""The forward's chains of pointwise work (norms, rope, gates, activations, residual adds), and how they run.

Between its matmuls a layer runs short chains of pointwise ops on whole activations: a norm is an upcast, a
reduction, a scale and a downcast; Qwen3.5's linear-attention output is a per-head norm, a weight, a silu
gate and two casts. Run eagerly, each op is a kernel that reads and writes the whole tensor, so on a GPU these
chains (with the dtype casts torch counts as copies) took about half of the kernel time of a 16 x 20 scoring
call in the H200 runs of `benchmarks/device_check.sh`, more than the GEMMs.

The chains are plain functions here, each what the eager code computes. The `pointwise` kernel choice
(`kernels.py`) decides how they run:

- `eager`: as written, op by op (what the CPU parity tests check against path A);
- `compiled`: each chain through `torch.compile` (Inductor), one generated kernel per chain where it can:
  the inputs read once, the output written once, the casts inside. On the H200 (`device_check.sh` v4 run
  1) this made a 16 x 20 scoring call 290k against 244k prompt tokens/s and a 64-row decode step 6.3 against
  8.0 ms; but (run 2) compiling took 111 s in `warm_up()` and 12-18 s more on the first calls of new
  shapes, and a host-bound 1 x 20 call got slower. So it is a choice for throughput jobs, not a default (`kernels.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

Norm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (x, weight, eps), a family's norm


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, head_dim); the first rotary_dim dims rotated (rotate-half layout), the rest passed."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos[:, None] + rotated * sin[:, None]
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def add_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, norm: Norm, eps: float):
    """The residual add and the next norm: (x + delta, norm(x + delta))."""
    x = x + delta
    return x, norm(x, weight, eps)


def _heads_norm_rope(proj: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: Norm,
                     eps: float, heads: int, gated: bool):
    n, d = proj.shape[0], weight.shape[0]
    gate = None
    if gated:
        proj, gate = proj.view(n, heads, 2 * d).chunk(2, dim=-1)
        gate = gate.reshape(n, heads * d)
    return apply_rope(norm(proj.reshape(n, heads, d), weight, eps), cos, sin), gate


def query_heads(proj: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: Norm, eps: float,
                heads: int, gated: bool):
    """The q projection (T, heads * d, or heads * 2d with Qwen3.5's output gate interleaved per head) as
    normed, rotated heads (T, heads, d), and the gate (T, heads * d) or None."""
    return _heads_norm_rope(proj, weight, cos, sin, norm, eps, heads, gated)


def key_heads(proj: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: Norm, eps: float,
              heads: int) -> torch.Tensor:
    """The k projection (T, heads * d) as normed, rotated heads (T, heads, d). (A function of its own, so that
    queries and keys each have their own compiled variants.)"""
    return _heads_norm_rope(proj, weight, cos, sin, norm, eps, heads, False)[0]


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(gate)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The MLP's activation: silu(gate) * up."""
    return F.silu(gate) * up


def delta_gates(b: torch.Tensor, a: torch.Tensor, neg_A: torch.Tensor, dt_bias: torch.Tensor):
    """Gated DeltaNet's write strength beta = sigmoid(b) and log decay g = -exp(A_log) softplus(a + dt_bias),
    `neg_A` = -exp(A_log) in float32, computed once at load."""
    return b.sigmoid(), neg_A * F.softplus(a.float() + dt_bias)


def gated_rms(core: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gated DeltaNet's output gate: core (T, heads, d) RMS-normed per head in float32, scaled by `weight` in
    the input dtype, times silu(z) (z (T, heads * d)); (T, heads * d) in core's dtype."""
    n, heads, d = core.shape
    dtype = core.dtype
    y = weight * F.rms_norm(core.float(), (d,), None, eps).to(dtype)
    return (y * F.silu(z.view(n, heads, d).float())).to(dtype).reshape(n, heads * d)


def conv_step(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """One decode token of the short convolution: window (A, kernel, C) of inputs, the newest last; weight
    (kernel, C). silu of the weighted sum (+ bias), in `dtype`."""
    out = (window.to(weight.dtype) * weight).sum(1)
    if bias is not None:
        out = out + bias
    return F.silu(out).to(dtype)


def eager(fn: Callable) -> Callable:
    return fn


@functools.cache
def compiled(fn: Callable) -> Callable:
    """`fn` through torch.compile: one compiled function per chain, shared by every layer (the weights are
    arguments, so every layer hits the same compiled code). A chain compiles once per dtype for its first
    shape, once more when the token count changes (then dynamic in it), and once for a single row; past
    torch's recompile limit (8 variants, reached only by many models in one process) it runs eagerly."""
    return torch.compile(fn)


RUN = {"eager": eager, "compiled": compiled}
