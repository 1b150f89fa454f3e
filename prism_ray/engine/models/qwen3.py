"""Qwen3 (the Prism 4B-exp reranker, on Qwen3-Reranker-4B): every layer full attention.

The family's facts: RMS norms scale by w directly (the input cast back before the scale, Llama style), rope
turns the whole head, attention has no output gate, and no layer scans in chunks, so a cached state may end
at any token (`chunk_align` 1). Sliding-window layers (which no Prism checkpoint uses) are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prism_ray.engine.models.base import Attention, Family


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * (x * rsqrt(mean(x^2) + eps)) in float32, cast back before the scale (torch's fused rms_norm where the
    device has one)."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def family(config) -> Family:
    rope = config.rope_parameters
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} is not supported (only 'default')")
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        raise ValueError("sliding-window attention is not supported")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Family("qwen3", rms_norm, lambda weight: weight, head_dim, float(rope["rope_theta"]), gated_attention=False, chunk_align=1,
                  eps=config.rms_norm_eps)


def mixers(config, layer_weights: list[dict[str, torch.Tensor]], fam: Family, kernels) -> list:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return [Attention(w, fam, kernels.linear, heads, kv_heads, head_dim, kernels.attend, kernels.run) for w in layer_weights]
