"""The batch job's typed config: one YAML file (`jobs/example.yaml`) or the `prism-ray batch` flags.

The model and its tiers are a `ModelConfig`, the very schema the Serve app reads: point
`serve_config` at a Serve config file and the job takes that model's resources (`num_gpus`,
`num_cpus`, torch threads) and replica range for its actor pools.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from prism_ray.api import ChunkingOptions
from prism_ray.batch.rows import ColumnNames
from prism_ray.config import ConfigFileError, ModelConfig, TierConfig, find_model, serve_config_models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvidenceOptions(_Strict):
    top_k: int = Field(ge=1, description="generate for each query's k best documents")
    min_score: float | None = Field(default=None, ge=0, le=1, description="and only those scoring at least this")
    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0)


class ActorRange(_Strict):
    """Actor pool size; omitted bounds come from the model's Serve tier (its replica range)."""

    min: int | None = Field(default=None, ge=1)
    max: int | None = Field(default=None, ge=1)

    def resolve(self, tier: TierConfig | None) -> tuple[int, int]:
        lo, hi = 1, 1
        if tier is not None and tier.num_replicas is not None:
            lo = hi = tier.num_replicas
        elif tier is not None and tier.autoscaling_config:
            lo = int(tier.autoscaling_config.get("min_replicas", 1)) or 1
            hi = int(tier.autoscaling_config.get("max_replicas", lo))
        lo = self.min or (min(lo, self.max) if self.max else lo)
        hi = max(self.max or hi, lo)
        return lo, hi


class BatchConfig(_Strict):
    input: str = Field(min_length=1, description="parquet file or directory; any filesystem pyarrow reaches")
    output: str = Field(min_length=1, description="directory for the output parquet dataset")
    model: str = Field(min_length=1, description="a model name or size from serve_config, a local dir, or a hub id")
    serve_config: str | None = Field(default=None, description="Serve config file whose model settings to reuse")
    models: list[ModelConfig] = Field(default_factory=list, description="models inline, as in a Serve app's args")
    dtype: str = Field(default="auto", description="when `model` is a dir or hub id")
    layout: Literal["auto", "long", "wide"] = "auto"
    columns: ColumnNames = Field(default_factory=ColumnNames)
    evidence: EvidenceOptions | None = None
    chunking: ChunkingOptions | None = Field(default=None, description="read long documents whole: best chunk's "
                                                                         "score, span in chunk_* columns")
    scorer_actors: ActorRange = Field(default_factory=ActorRange)
    evidence_actors: ActorRange = Field(default_factory=ActorRange)
    serve_app: str | None = Field(default=None, description="use this running Serve app's deployments, not new actors")
    pairs_per_file: int = Field(default=2000, ge=1, description="about this many pairs per output file")
    overwrite: bool = Field(default=False, description="delete an existing output instead of resuming it")


def resolve_model(cfg: BatchConfig) -> ModelConfig:
    """The job's ModelConfig: inline `models` or the Serve config file by name/path/size, else a dir or hub id."""
    models = [*cfg.models, *(serve_config_models(cfg.serve_config) if cfg.serve_config else [])]
    found = find_model(models, cfg.model)
    if found is not None:
        return found.model_copy(deep=True)
    if cfg.serve_config:
        raise ConfigFileError(f"model {cfg.model!r} is not in {cfg.serve_config}; its models: {[m.name for m in models]}")
    return ModelConfig(name=Path(cfg.model).name or cfg.model, model=cfg.model, dtype=cfg.dtype)
