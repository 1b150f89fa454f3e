"""One module per backbone family; `build` turns a loaded checkpoint's weights into the engines' `Model`.

transformers loads the weights (local directory or hub id, any dtype, tied heads); the engines only read
its parameter tensors, by their checkpoint names, and never call its forward. A new backbone is one new
module with a `family(config)` and a `mixers(config, layer_weights, family, linear)`.
"""

from __future__ import annotations

import torch

from prism_ray.engine.models import qwen3, qwen3_5
from prism_ray.engine.models.base import DecoderLayer, Model, Rows, SequenceState, SlotPool, pack

FAMILIES = {"qwen3_5_text": qwen3_5, "qwen3_5": qwen3_5, "qwen3": qwen3}

__all__ = ["FAMILIES", "Model", "Rows", "SequenceState", "SlotPool", "build", "pack"]


def _decoder(lm: torch.nn.Module) -> torch.nn.Module:
    """The text decoder (embed_tokens, layers, norm) of a *ForCausalLM or a multimodal *ForConditionalGeneration."""
    inner = lm.model
    return getattr(inner, "language_model", inner)


def build(lm: torch.nn.Module, kernels) -> Model:
    config = lm.config.get_text_config()
    module = FAMILIES.get(config.model_type)
    if module is None:
        raise ValueError(f"model_type {config.model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    fam = module.family(config)
    decoder = _decoder(lm)
    params = {name: p.detach() for name, p in decoder.named_parameters()}
    layer_weights = []
    for i in range(config.num_hidden_layers):
        prefix = f"layers.{i}."
        layer_weights.append({n[len(prefix):]: t for n, t in params.items() if n.startswith(prefix)})
    layers = [DecoderLayer(w, fam, mixer, kernels.linear, kernels.run)
              for w, mixer in zip(layer_weights, module.mixers(config, layer_weights, fam, kernels))]
    return Model(fam, params["embed_tokens.weight"], layers, params["norm.weight"], lm.get_output_embeddings().weight.detach(),
                 kernels.linear, kernels.run)
