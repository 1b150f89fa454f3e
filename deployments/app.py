"""The app builder: a typed config becomes a Serve application.

    serve run deployments/local.yaml          # a Serve config file whose import_path is this builder
    prism-ray serve deployments/local.yaml

One scorer and (optionally) one evidence deployment per model, each with its own replicas and
autoscaling, behind one router.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.evidence import Evidence
from deployments.router import Router
from deployments.scorer import Scorer
from prism_ray.config import AppConfig
from prism_ray.factory import deployment_name, pin_checkpoint


def build_app(args: dict[str, Any]) -> Application:
    config = AppConfig.model_validate(args)
    for m in config.models:
        pin_checkpoint(m)
    scorers, evidences = [], []
    for m in config.models:
        spec = m.model_dump(mode="json")
        scorers.append(Scorer.options(**m.scorer.deployment_options(deployment_name(m.name, "scorer"))).bind(spec))
        evidences.append(
            Evidence.options(**m.evidence.deployment_options(deployment_name(m.name, "evidence"))).bind(spec)
            if m.evidence is not None else None
        )
    r = config.router
    return Router.options(name="router", num_replicas=r.num_replicas, ray_actor_options=r.ray_actor_options,
                          max_ongoing_requests=r.max_ongoing_requests,
                          graceful_shutdown_timeout_s=r.graceful_shutdown_timeout_s).bind(
        config.model_dump(mode="json"), scorers, evidences)
