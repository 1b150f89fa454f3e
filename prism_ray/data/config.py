"""The processor's typed config, and the parts of it the batch job's config shares.

A model is named as the Serve app names it: a name or size in a Serve config file (`serve_config`) or
in `models` (inline `ModelConfig`s), else a local checkpoint directory or a hub id. Actor resources
and pool sizes default to that model's Serve tiers, so one config file sizes both the online and the
batch side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prism_ray.api import ChunkingOptions
from prism_ray.data.rows import ColumnNames
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


class ModelSource(_Strict):
    """Which model, found the way the Serve app finds it."""

    model: str = Field(min_length=1, description="a model name or size from serve_config, a local dir, or a hub id")
    serve_config: str | None = Field(default=None, description="Serve config file whose model settings to reuse")
    models: list[ModelConfig] = Field(default_factory=list, description="models inline, as in a Serve app's args")
    dtype: str = Field(default="auto", description="when `model` is a dir or hub id")

    def resolve_model(self) -> ModelConfig:
        """The ModelConfig: inline `models` or the Serve config file by name/path/size, else a dir or hub id."""
        models = [*self.models, *(serve_config_models(self.serve_config) if self.serve_config else [])]
        found = find_model(models, self.model)
        if found is not None:
            return found.model_copy(deep=True)
        if self.serve_config:
            raise ConfigFileError(f"model {self.model!r} is not in {self.serve_config}; "
                                  f"its models: {[m.name for m in models]}")
        return ModelConfig(name=Path(self.model).name or self.model, model=self.model, dtype=self.dtype)


Concurrency = int | tuple[int, int]


class PrismProcessorConfig(ModelSource):
    """What `prism_ray.data.build_processor` builds a Dataset -> Dataset processor from.

    layout `wide`: one row per query, a `query` column and a `documents` column (a list of strings, or of
    `{"text": ...}`); each output row adds `scores` (document order), `ranking` (document indices, best
    first), `truncated`, `error`, and with evidence `contributions` / `evidences`.
    layout `long`: one row per pair (`query_id`, `query`, `doc_id`, `text`); each output row adds `score`,
    `logit`, `rank` (within its query), `truncated`, `num_tokens`, `error`, and with evidence
    `contribution`, `evidence`, `evidence_truncated`, `generation`. A query's rows are brought together
    (hashed on `query_id` into `num_groups` groups) so its prefix state is computed once.
    Every input column is kept. Column names are set in `columns`.
    """

    layout: Literal["wide", "long"] = "wide"
    columns: ColumnNames = Field(default_factory=ColumnNames)
    concurrency: Concurrency | None = Field(default=None, description="scorer actors: n, or (min, max); default: "
                                                                      "the model's scorer replica range")
    evidence_concurrency: Concurrency | None = Field(default=None, description="evidence actors, as concurrency")
    num_gpus: float | None = Field(default=None, ge=0, description="per actor; default: the tier's actor options")
    num_cpus: float | None = Field(default=None, ge=0, description="per actor; default: the tier's actor options")
    evidence: EvidenceOptions | None = None
    chunking: ChunkingOptions | None = Field(default=None, description="read long documents whole: a document's "
                                                                       "score is its best chunk's")
    serve_app: str | None = Field(default=None, description="score through this running Serve app's deployments "
                                                            "instead of new actors")
    batch_size: int = Field(default=16, ge=1, description="wide layout: query rows per actor call")
    num_groups: int = Field(default=64, ge=1, description="long layout: query groups; one group is scored in one "
                                                          "actor call, so a group holds about 1/num_groups of the "
                                                          "pairs: raise it for large datasets")

    @field_validator("concurrency", "evidence_concurrency")
    @classmethod
    def _valid_range(cls, value: Concurrency | None) -> Concurrency | None:
        lo, hi = (value, value) if isinstance(value, int) else (value or (1, 1))
        if lo < 1 or hi < lo:
            raise ValueError(f"must be an actor count >= 1 or a range (min, max) with 1 <= min <= max, not {value!r}")
        return value

    def actor_range(self, stage: Literal["scorer", "evidence"], tier: TierConfig | None) -> tuple[int, int]:
        value = self.concurrency if stage == "scorer" else self.evidence_concurrency
        if value is None:
            return ActorRange().resolve(tier)
        return (value, value) if isinstance(value, int) else tuple(value)
