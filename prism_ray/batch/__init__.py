"""Batch reranking of parquet datasets on Ray Data, with the engines the Serve tiers use.

`run_batch(BatchConfig(...))` is what `prism-ray batch` and `jobs/batch_rerank.py` call. Only
`job` and `work` touch Ray, and only when a job runs: `import prism_ray` stays Ray-free.
"""

from prism_ray.batch.config import BatchConfig

__all__ = ["BatchConfig", "run_batch"]


def run_batch(cfg: BatchConfig, progress: bool = True):
    from prism_ray.batch.job import run_batch as _run

    return _run(cfg, progress)
