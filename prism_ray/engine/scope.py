"""The scope in which the engines' own kernels replace transformers' defaults.

The engines swap in faster code for two things transformers does in a generic way (`gated_delta.py`
for the Gated DeltaNet scan, `linear.py` for float32 projections on CPU). They do so only inside
`engine_kernels()`, a context variable set for the duration of an engine call in the calling thread
or task, so a reference model running in the same process on the same weights (the benchmarks' path A,
the parity tests' references) keeps transformers' own code and stays an independent baseline.
"""

from __future__ import annotations

import contextlib
import contextvars

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("prism_engine_kernels", default=False)


def active() -> bool:
    """Whether the calling thread or task is inside `engine_kernels()`."""
    return _ACTIVE.get()


@contextlib.contextmanager
def engine_kernels():
    """Within the block, the engines' kernels run (see the module docstring)."""
    from prism_ray.engine.gated_delta import install

    install()
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
