"""The two engines: ScoreEngine (one forward pass, prefix reuse) and EvidenceEngine (generation).

Engines never import Ray: Serve deployments and Ray Data actors wrap them.
"""

from prism_ray.engine.evidence import EvidenceEngine, EvidenceResult
from prism_ray.engine.loading import LoadedModel, ModelLoadError, load_model
from prism_ray.engine.scheduler import GenerationHandle, QueueFull, Scheduler, SchedulerClosed, StepReport
from prism_ray.engine.score import ScoreEngine, ScoreResult

__all__ = [
    "EvidenceEngine", "EvidenceResult", "GenerationHandle", "LoadedModel", "ModelLoadError", "QueueFull", "Scheduler",
    "SchedulerClosed", "ScoreEngine", "ScoreResult", "StepReport", "load_model",
]
