"""prism-ray: serving and batch reranking for the Prism reranker family.

The library part (this package) holds everything that is not Ray plumbing: the exact prompt,
output parsing, checkpoint registry and test-checkpoint builder, and the two engines. A Python user
starts at `prism_ray.Reranker` (`prism_ray/reranker.py`).
"""

__version__ = "0.1.0"

__all__ = ["Reranker", "__version__"]


def __getattr__(name: str):
    """`prism_ray.Reranker` is imported on first use: `import prism_ray` stays free of torch."""
    if name == "Reranker":
        from prism_ray.reranker import Reranker

        return Reranker
    raise AttributeError(f"module 'prism_ray' has no attribute {name!r}")
