"""Which kernels the Gated DeltaNet layers of a Qwen3.5 checkpoint run on, said once per process.

On CUDA, transformers runs the gated delta rule in the `flash-linear-attention` Triton kernels and the
short convolution in `causal-conv1d` when those packages are installed, and otherwise in its PyTorch
reference code, which it warns is far slower. `pip install "prism-ray[gpu]"` installs
flash-linear-attention (pure Triton, no build step); causal-conv1d ships only as a source package that
compiles against the local CUDA toolkit (`pip install causal-conv1d --no-build-isolation`).
Wherever the Triton kernels do not run (every CPU), the engines run the gated delta rule in their own
PyTorch code (`gated_delta.py`, "prism"), and the short convolution in transformers' reference code.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("prism_ray")


def linear_attention_kernels(device: torch.device) -> dict[str, str]:
    """{"gated_delta_rule": ..., "causal_conv1d": ...} inside the engines: "fla" (Triton) or "prism"
    (`gated_delta.py`); "causal_conv1d" or "torch" (transformers' reference)."""
    from transformers.utils.import_utils import is_causal_conv1d_available, is_flash_linear_attention_available

    cuda = device.type == "cuda"
    return {"gated_delta_rule": "fla" if cuda and is_flash_linear_attention_available() else "prism",
            "causal_conv1d": "causal_conv1d" if cuda and is_causal_conv1d_available() else "torch"}


@functools.cache
def log_kernels(device_type: str, has_linear_attention: bool) -> dict[str, str] | None:
    """Logs (once per device type) which kernels the linear-attention layers use; returns them."""
    if not has_linear_attention:
        return None
    kernels = linear_attention_kernels(torch.device(device_type))
    slow = device_type == "cuda" and (kernels["gated_delta_rule"] != "fla" or kernels["causal_conv1d"] != "causal_conv1d")
    (log.warning if slow else log.info)(
        "Gated DeltaNet kernels on %s: gated delta rule = %s, short conv = %s%s", device_type,
        kernels["gated_delta_rule"], kernels["causal_conv1d"],
        " (PyTorch code: install prism-ray[gpu] for the Triton kernels)" if slow else "")
    return kernels
