"""prism-ray: serving and batch reranking for the Prism reranker family.

The library part (this package) holds everything that is not Ray plumbing: the exact prompt,
output parsing, checkpoint registry and test-checkpoint builder, and the two engines.
"""

__version__ = "0.1.0"
