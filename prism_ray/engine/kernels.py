"""Which kernels the engines' forward runs, chosen once when a model loads and logged.

- projections (`linear`): torch's `F.linear`, or on CPU in float32 oneDNN's where measured faster (`linear.py`);
- prefill attention (`attention`): `sdpa`, one SDPA call per row (CPU), or `padded`, one masked SDPA call for
  all rows of a forward (CUDA: a constant number of launches per layer) (`attention.py`);
- the chunked gated delta rule of Qwen3.5's linear-attention layers (`gated_delta_rule`): `prism`, the
  project's scan over packed rows (`delta_rule.py`), or `fla`, flash-linear-attention's variable-length Triton
  kernels (CUDA with `prism-ray[gpu]`; `fla_ops.py`);
- the short convolution of prefill (`causal_conv1d`): `torch`, one grouped `F.conv1d` over the packed rows
  behind their carried-over inputs, or `fla`, fla's variable-length Triton kernel (CUDA; rows whose states
  are kept still run `torch`, which leaves them in its stream);
- the pointwise chains between the matmuls (`pointwise`): `eager`, op by op, or `compiled`, each chain one
  torch.compile'd kernel where Inductor can (`pointwise.py`);
- decode: masked SDPA over the slot pool, the project's recurrent step and a weighted sum for the
  convolution, the same on every device; on CUDA each step is replayed from a CUDA graph (`graphs.py`, an
  `EvidenceEngine` setting rather than a kernel).

Defaults per device and dtype (`defaults`); `ModelConfig.kernels` (or `load_model(kernels=...)`) overrides any
of them by name. Nothing GPU-only is a default before a device run has checked it against the CPU kernels
(`benchmarks/device_check.sh` compares every choice).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from prism_ray.engine import attention, delta_rule, fla_ops, pointwise
from prism_ray.engine.linear import linear_for

log = logging.getLogger("prism_ray")


def prism_delta_rule(q, k, v, g, beta, rows, initial, output_final_state: bool):
    """`delta_rule.chunk_rows` over packed rows, its chunk layout built once per call for all layers."""
    layout = rows.cached("chunks", lambda: delta_rule.ChunkLayout.of(rows.lengths, rows.device))
    return delta_rule.chunk_rows(q, k, v, g, beta, rows.lengths, initial, output_final_state, layout=layout)


DELTA_RULE = {"prism": prism_delta_rule, "fla": fla_ops.delta_rule}
CONV = {"torch": None, "fla": fla_ops.conv}  # None: the model's own F.conv1d over the packed stream
CHOICES = {"attention": tuple(attention.PREFILL), "gated_delta_rule": tuple(DELTA_RULE), "causal_conv1d": tuple(CONV),
           "pointwise": tuple(pointwise.RUN)}
DEFAULTS = {"cpu": {"attention": "sdpa", "gated_delta_rule": "prism", "causal_conv1d": "torch", "pointwise": "eager"},
            "cuda": {"attention": "padded", "gated_delta_rule": "prism", "causal_conv1d": "torch", "pointwise": "eager"}}


def defaults(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """The device's kernels. On CUDA in bf16/fp16, fla's gated delta rule and convolution where fla is installed
    (faster than the project's kernels in the H200 runs of `device_check.sh`, README). float32, the parity
    dtype, keeps the project's kernels, which the CPU tests check against path A.

    The pointwise chains stay eager everywhere. Compiled, they cut the GPU's kernel time (v4 run 1 on the
    H200: 16 x 20 scoring 290k against 244k prompt tokens/s, a 64-row decode step 6.3 against 8.0 ms), but
    v4 run 2 measured what that costs a replica: `warm_up()` took 111 s of compiling, the first 1 x 20 and
    16 x 20 calls after it 12 and 18 s more, and warm, where the host is the bottleneck, 1 x 20 was slower
    (108 against 91 ms, medians of 7) for 10 % at 16 x 20 (436 against 479 ms). `pointwise: compiled` is
    there for throughput jobs that can pay the start."""
    names = dict(DEFAULTS.get(device.type, DEFAULTS["cpu"]))
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and fla_ops.available():
        names.update(gated_delta_rule="fla", causal_conv1d="fla")
    return names


@dataclass(frozen=True)
class Kernels:
    """What a model's forward calls: the projection function and the prefill kernels, and their names."""

    names: dict[str, str]
    linear: object  # (x, weight, bias) -> x @ weight.T + bias
    attend: object  # `attention.PREFILL` entry
    delta_rule: object  # `DELTA_RULE` entry
    conv: object  # `CONV` entry: None for the model's own
    run: object  # `pointwise.RUN` entry: how the pointwise chains run


def validate(overrides: Mapping[str, str] | None) -> dict[str, str]:
    """The overrides, checked: each op one of `CHOICES`, each name one of its kernels (a ValueError naming
    the op and the choices otherwise)."""
    out = dict(overrides or {})
    for op, name in out.items():
        if op not in CHOICES:
            raise ValueError(f"kernels: unknown op {op!r}; choose from {sorted(CHOICES)}")
        if name not in CHOICES[op]:
            raise ValueError(f"kernels.{op} must be one of {list(CHOICES[op])}, not {name!r}")
    return out


def _largest_projection(lm: torch.nn.Module) -> tuple[int, int]:
    """The largest decoder-layer projection's shape (the LM head, a vocabulary of rows, is not typical)."""
    shapes = [tuple(p.shape) for n, p in lm.named_parameters() if p.ndim == 2 and ".layers." in f".{n}" and p.shape[0] < 65536]
    return max(shapes, key=lambda s: s[0] * s[1]) if shapes else (1, 1)


def choose_kernels(lm: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                   overrides: Mapping[str, str] | None = None) -> Kernels:
    """The kernels for this model on this device: the device's defaults, then `overrides`."""
    linear_name, linear = linear_for(_largest_projection(lm), dtype, device)
    names = {**defaults(device, dtype), **validate(overrides)}
    for op in ("gated_delta_rule", "causal_conv1d"):
        if names[op] == "fla" and not (device.type == "cuda" and fla_ops.available()):
            raise ValueError(f"kernels.{op} = 'fla' needs a CUDA device and flash-linear-attention (pip install 'prism-ray[gpu]')")
    hybrid = "linear_attention" in (getattr(lm.config.get_text_config(), "layer_types", None) or ())
    shown = {"linear": linear_name, "attention": names["attention"]}
    if hybrid:
        shown.update(gated_delta_rule=names["gated_delta_rule"], causal_conv1d=names["causal_conv1d"])
    shown["pointwise"] = names["pointwise"]
    log.info("engine kernels on %s (%s): %s", device.type, str(dtype).replace("torch.", ""),
             ", ".join(f"{op} = {name}" for op, name in shown.items()))
    return Kernels(shown, linear, attention.PREFILL[names["attention"]], DELTA_RULE[names["gated_delta_rule"]],
                   CONV[names["causal_conv1d"]], pointwise.RUN[names["pointwise"]])
