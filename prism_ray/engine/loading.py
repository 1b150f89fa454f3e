"""Loading a checkpoint (local dir or hub id) once, for either engine."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prism_ray.allocator import tune_allocator
from prism_ray.engine import models
from prism_ray.engine.kernels import choose_kernels
from prism_ray.engine.prefix import PrefixCache
from prism_ray.prompt import DEFAULT_MAX_LENGTH, PrismPromptTokenizer


class ModelLoadError(RuntimeError):
    """The checkpoint could not be found or loaded; the message says which and why."""


@dataclass
class LoadedModel:
    """A checkpoint ready for the engines: `net` is the engines' own forward over its weights."""

    name: str
    model: torch.nn.Module  # transformers' *ForCausalLM (eval) that loaded the weights; the engines never call it
    prompts: PrismPromptTokenizer
    device: torch.device
    dtype: torch.dtype
    net: models.Model = field(repr=False)
    kernels: dict[str, str] = field(default_factory=dict)  # what runs, per op (`kernels.choose_kernels`)
    prefixes: PrefixCache = field(init=False, repr=False)

    def __post_init__(self):
        self.prefixes = PrefixCache(self.net, self.prompts)


def computes_bf16_natively(device: torch.device) -> bool:
    """Whether `device` has bf16 arithmetic in hardware: CUDA GPUs that support it, and CPUs with
    AVX512-BF16 or AMX (where bf16 matmuls run at about twice the fp32 rate; elsewhere torch emulates
    bf16 and it is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(probe() for probe in probes if probe is not None)
    return False


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" means bf16 wherever the hardware computes it natively (what the model card serves with),
    fp32 elsewhere. Parity with the reference paths is defined (and tested) in "float32"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if computes_bf16_natively(device) else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}") from None


def load_model(model: str | Path, dtype: str | torch.dtype = "auto", device: str | None = None,
               max_length: int = DEFAULT_MAX_LENGTH, kernels: Mapping[str, str] | None = None) -> LoadedModel:
    """Load a Prism checkpoint from a local directory or a hub id. `kernels` overrides the device's default
    kernels by op (`kernels.CHOICES`, e.g. {"attention": "padded"})."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(model)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, dev)
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not (Path(name).expanduser() / "config.json").is_file():
        raise ModelLoadError(f"model directory {name!r} not found or has no config.json")
    try:
        tok = AutoTokenizer.from_pretrained(name)
        lm = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {exc}".splitlines()[0]) from exc
    lm = lm.to(dev).eval()
    if dev.type == "cpu":
        tune_allocator()
    chosen = choose_kernels(lm, dev, torch_dtype, kernels)
    prompts = PrismPromptTokenizer(tok, max_length=max_length)
    return LoadedModel(name, lm, prompts, dev, torch_dtype, _net(name, lm, chosen, prompts), chosen.names)


def _net(name: str, lm: torch.nn.Module, kernels, prompts: PrismPromptTokenizer) -> models.Model:
    try:
        net = models.build(lm, kernels)
    except ValueError as exc:
        raise ModelLoadError(f"cannot run model {name!r}: {exc}") from exc
    net.set_score_tokens(prompts.yes_id, prompts.no_id)
    return net


def with_kernels(loaded: LoadedModel, kernels: Mapping[str, str]) -> LoadedModel:
    """The same loaded weights run by other kernels (a new forward over the same tensors, nothing copied):
    for benchmarks and checks that compare kernels in one process."""
    chosen = choose_kernels(loaded.model, loaded.device, loaded.dtype, kernels)
    return LoadedModel(loaded.name, loaded.model, loaded.prompts, loaded.device, loaded.dtype,
                       _net(loaded.name, loaded.model, chosen, loaded.prompts), chosen.names)
