"""Which tier failures are worth another try, and the loop that tries again.

Scoring and greedy evidence are pure functions of their input (seeded sampling too), so a call that
failed only because its replica died, was restarted or could not be reached is safe to send again:
the handle routes it to another replica, or to the restarted one. A caller's mistake or an engine
error (a `RayTaskError` wrapping, say, a ValueError) would fail the same way again: it is raised.
The caller bounds the loop with its deadline (`asyncio.timeout`), which also cancels a call in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import ReplicaUnavailableError

T = TypeVar("T")

FIRST_DELAY_S = 0.05
MAX_DELAY_S = 1.0


def replica_lost(exc: BaseException) -> bool:
    """True when `exc` says the replica went away, not that the request was wrong."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (RayActorError, ReplicaUnavailableError)):
            return True
        # An actor death can arrive wrapped: as the cause of a task error, or of a Serve exception.
        exc = exc.cause if isinstance(exc, RayTaskError) else exc.__cause__
    return False


async def with_retries(call: Callable[[], Awaitable[T]], on_retry: Callable[[BaseException], None],
                       first_delay_s: float = FIRST_DELAY_S, max_delay_s: float = MAX_DELAY_S) -> T:
    """`await call()`, again after a lost replica (backing off up to `max_delay_s`), until it answers or
    raises something else. Unbounded by itself: run it under the request's deadline."""
    delay = first_delay_s
    while True:
        try:
            return await call()
        except Exception as exc:
            if not replica_lost(exc):
                raise
            on_retry(exc)
        await asyncio.sleep(delay)
        delay = min(2 * delay, max_delay_s)
