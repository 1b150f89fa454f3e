"""Prism reranking as a step of your own Ray Data pipeline: `build_processor(config)(ds)` is a new Dataset.

    from prism_ray.data import build_processor
    rerank = build_processor({"model": "prism-0.8b", "serve_config": "deployments/cluster-gpu.yaml"})
    ranked = rerank(ray.data.read_json("queries.jsonl")).filter(lambda r: max(r["scores"]) > 0.5)

The actors are the Serve tiers' engines (`prism_ray.factory.build_engine`), or a running Serve app's
deployments (`serve_app`). `prism-ray batch` runs the same stages with a sink that writes parquet.
Importing this package does not import Ray; building a processor does.
"""

from prism_ray.data.config import EvidenceOptions, PrismProcessorConfig

__all__ = ["EvidenceOptions", "PrismProcessorConfig", "Processor", "build_processor"]


def __getattr__(name: str):
    if name in ("Processor", "build_processor"):
        from prism_ray.data import processor

        return getattr(processor, name)
    raise AttributeError(f"module 'prism_ray.data' has no attribute {name!r}")
