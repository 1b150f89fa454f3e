"""One factory for both hosts: what a Serve replica and a Ray Data actor build from a `ModelConfig`.

Serve tiers (`deployments/`) and batch actors (`prism_ray.batch`) call these functions and nothing
else to name a tier, to find its checkpoint and to build its engine, so "same engines, same config"
holds by construction rather than by two copies kept in step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prism_ray.config import ModelConfig, TierConfig

log = logging.getLogger("prism_ray")

Tier = Literal["scorer", "evidence"]
TIERS: tuple[Tier, ...] = ("scorer", "evidence")


def deployment_name(model_name: str, tier: Tier) -> str:
    """The Serve deployment of a model's tier, e.g. `prism-0.8b-scorer`."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")
    return f"{model_name}-{tier}"


def pin_checkpoint(model: ModelConfig) -> ModelConfig:
    """Makes a local checkpoint path absolute and builds the configured test checkpoint if missing.

    Call it once in the driver (app builder, batch job): replicas and actors may start in another
    working directory, and several of them building one test checkpoint would race on its folder.
    Hub ids are left as they are. Changes `model` in place and returns it.
    """
    if model.build_preset or Path(model.model).exists():
        model.model = str(Path(model.model).expanduser().resolve())
        if model.build_preset and not (Path(model.model) / "config.json").is_file():
            from prism_ray.checkpoints import build_checkpoint

            build_checkpoint(model.build_preset, model.model)
    return model


@dataclass(frozen=True)
class EngineSettings:
    """Everything an engine is built with; equal settings mean interchangeable engines."""

    tier: Tier
    checkpoint: str
    dtype: str
    device: str | None
    max_length: int
    torch_threads: int | None
    token_budget: int | None = None  # scorer: prompt tokens per forward, packed (None: the device default)
    max_active_pairs: int | None = None  # evidence: pairs decoding at once (slots)
    kernels: tuple[tuple[str, str], ...] = ()  # (op, kernel) overrides of the device's defaults
    cuda_graphs: bool | None = None  # evidence: decode steps replayed from CUDA graphs (None: on CUDA)


def tier_config(model: ModelConfig, tier: Tier) -> TierConfig:
    cfg = model.scorer if tier == "scorer" else model.evidence
    if cfg is None:
        raise ValueError(f"model {model.name!r} has no {tier} tier configured")
    return cfg


def engine_settings(model: ModelConfig, tier: Tier) -> EngineSettings:
    cfg = tier_config(model, tier)
    return EngineSettings(
        tier=tier, checkpoint=model.model, dtype=model.dtype, device=model.device, max_length=model.max_length,
        torch_threads=cfg.torch_threads,
        token_budget=model.scorer.engine_token_budget if tier == "scorer" else None,
        max_active_pairs=model.evidence.max_active_pairs if tier == "evidence" else None,
        kernels=tuple(sorted(model.kernels.items())),
        cuda_graphs=model.evidence.cuda_graphs if tier == "evidence" else None,
    )


def build_engine(model: ModelConfig, tier: Tier):
    """The tier's engine (ScoreEngine or EvidenceEngine), loaded in this process and warmed up (one small
    call, so a replica's first request does not pay the kernels' compile; `engine.warm_up_s` says how long).

    Sets torch's thread count first when the tier configures one: Ray sets OMP_NUM_THREADS from an
    actor's `num_cpus`, and a tier may want another count for its compute thread.
    """
    import torch

    from prism_ray.engine import EvidenceEngine, ScoreEngine, load_model

    s = engine_settings(model, tier)
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    loaded = load_model(s.checkpoint, dtype=s.dtype, device=s.device, max_length=s.max_length, kernels=dict(s.kernels))
    engine = (ScoreEngine(loaded, token_budget=s.token_budget) if tier == "scorer"
              else EvidenceEngine(loaded, max_batch_size=s.max_active_pairs, cuda_graphs=s.cuda_graphs))
    engine.settings = s
    engine.warm_up_s = engine.warm_up()
    log.info("%s engine for %s warmed up in %.2f s", tier, s.checkpoint, engine.warm_up_s)
    return engine
