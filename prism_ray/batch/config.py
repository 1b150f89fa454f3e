"""The batch job's typed config: one YAML file (`jobs/example.yaml`) or the `prism-ray batch` flags.

The model and its tiers are a `ModelConfig`, the very schema the Serve app reads: point
`serve_config` at a Serve config file and the job takes that model's resources (`num_gpus`,
`num_cpus`, torch threads) and replica range for its actor pools. How the model is named, and the
evidence options, are the processor's (`prism_ray.data.config`): the job runs the processor's stages.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from prism_ray.api import ChunkingOptions
from prism_ray.data.config import ActorRange, EvidenceOptions, ModelSource
from prism_ray.data.rows import ColumnNames

__all__ = ["ActorRange", "BatchConfig", "EvidenceOptions"]


class BatchConfig(ModelSource):
    input: str = Field(min_length=1, description="parquet file or directory; any filesystem pyarrow reaches")
    output: str = Field(min_length=1, description="directory for the output parquet dataset")
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
