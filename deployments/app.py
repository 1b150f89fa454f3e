"""The app builder: a typed config becomes a Serve application.

    serve run deployments/local.yaml          # a Serve config file whose import_path is this builder
    prism-ray serve deployments/local.yaml

One scorer and (optionally) one evidence deployment per model, each with its own replicas and
autoscaling, behind one router.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from deployments.evidence import Evidence
from deployments.router import Router
from deployments.scorer import Scorer
from prism_ray.config import AppConfig


def build_app(args: dict[str, Any]) -> Application:
    config = AppConfig.model_validate(args)
    for m in config.models:
        # Replicas may start in another working directory: pin local checkpoint paths now. Test
        # checkpoints are built here, once, rather than by several replicas racing on one directory.
        if m.build_preset or Path(m.model).exists():
            m.model = str(Path(m.model).resolve())
            m.ensure_checkpoint()
    scorers, evidences = [], []
    for m in config.models:
        spec = m.model_dump(mode="json")
        scorers.append(Scorer.options(**m.scorer.deployment_options(f"{m.name}-scorer")).bind(spec))
        evidences.append(
            Evidence.options(**m.evidence.deployment_options(f"{m.name}-evidence")).bind(spec)
            if m.evidence is not None else None
        )
    r = config.router
    return Router.options(name="router", num_replicas=r.num_replicas, ray_actor_options=r.ray_actor_options,
                          max_ongoing_requests=r.max_ongoing_requests).bind(
        config.model_dump(mode="json"), scorers, evidences)
