"""Which kernels the engines' forward runs, chosen once when a model loads and logged.

- projections: torch's `F.linear`, or on CPU in float32 oneDNN's where measured faster (`linear.py`);
- the gated delta rule of Qwen3.5's linear-attention layers: the project's chunked scan over packed rows and
  its recurrent step (`delta_rule.py`), on every device for now;
- the short convolution: one grouped `F.conv1d` over the packed rows (prefill), a weighted sum (decode);
- attention: torch's scaled_dot_product_attention, per row in prefill, masked in decode.

flash-linear-attention's variable-length Triton kernels (`prism-ray[gpu]`) and CUDA graphs for decode are
the GPU path still to come: nothing GPU-only runs before a device run has checked it against these.
"""

from __future__ import annotations

import logging

import torch

from prism_ray.engine.linear import linear_for

log = logging.getLogger("prism_ray")


def _largest_projection(lm: torch.nn.Module) -> tuple[int, int]:
    """The largest decoder-layer projection's shape (the LM head, a vocabulary of rows, is not typical)."""
    shapes = [tuple(p.shape) for n, p in lm.named_parameters() if p.ndim == 2 and ".layers." in f".{n}" and p.shape[0] < 65536]
    return max(shapes, key=lambda s: s[0] * s[1]) if shapes else (1, 1)


def choose_kernels(lm: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    """({op: kernel name}, the projection function) for this model on this device."""
    linear_name, linear = linear_for(_largest_projection(lm), dtype, device)
    hybrid = "linear_attention" in (getattr(lm.config.get_text_config(), "layer_types", None) or ())
    kernels = {"linear": linear_name, "attention": "sdpa"}
    if hybrid:
        kernels.update(gated_delta_rule="prism", causal_conv1d="torch")
    log.info("engine kernels on %s (%s): %s", device.type, str(dtype).replace("torch.", ""),
             ", ".join(f"{op} = {name}" for op, name in kernels.items()))
    return kernels, linear
