"""A request body under its limits, read piece by piece: shared by the router and the proxy's guard.

A body is refused as soon as its bytes pass `max_body_bytes` (413), whatever its framing, so the rest is
never read; it must arrive within `body_timeout_s` (408); and every byte read is held against a
process-wide budget, `max_in_flight_bytes` (429), until its request ends, so that many large bodies at
once meet a refusal rather than a process out of memory.
"""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect

from prism_ray.errors import ErrorKind, PrismError
from prism_ray.limits import LIMITS


class ByteBudget:
    """The bytes of request bodies one process holds at once (`limits.max_in_flight_bytes`), taken as they
    are read and given back when their request ends."""

    def __init__(self, limit: int, retry_after_s: int):
        self.limit, self.retry_after_s, self.used = limit, retry_after_s, 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise LIMITS["max_in_flight_bytes"].refusal(self.limit, value=self.used, retry_after_s=self.retry_after_s)
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


def too_large(size: str, limit: int) -> PrismError:
    return LIMITS["max_body_bytes"].refusal(limit, "body", size)


def check_declared_length(content_length: str, limit: int) -> None:
    """A `Content-Length` header over `limit` is refused (413) before a byte of the body is read."""
    if content_length.isdigit() and int(content_length) > limit:
        raise too_large(content_length, limit)


class BodyMeter:
    """One body's bytes as its pieces arrive: past `limit` a 413, each piece taken from `budget` (a 429 when
    it is spent). `release` gives back what was taken, once the request ends or fails."""

    def __init__(self, limit: int, budget: ByteBudget | None = None):
        self.limit, self.budget, self.size = limit, budget, 0

    def add(self, n: int) -> None:
        if self.size + n > self.limit:
            raise too_large(f"more than {self.limit}", self.limit)
        if self.budget is not None:
            self.budget.take(n)
        self.size += n

    def release(self) -> None:
        if self.budget is not None:
            self.budget.give(self.size)
        self.size = 0


async def read_limited(chunks, limit: int, budget: ByteBudget | None = None) -> bytes:
    """A body from its pieces, refused (413) once it passes `limit` bytes: the rest is never read. Each
    piece is taken from `budget` as it arrives (429 when the budget is spent); on success the caller owns
    `len(body)` bytes of it, on failure they are given back here."""
    meter, parts = BodyMeter(limit, budget), []
    try:
        async for chunk in chunks:
            meter.add(len(chunk))
            parts.append(chunk)
    except BaseException:
        meter.release()
        raise
    return b"".join(parts)


async def read_body(chunks, lim, budget: ByteBudget, deadline: float) -> bytes:
    """`read_limited` within `lim.body_timeout_s` from now and `deadline` (event-loop time): past either, a
    408 naming the limit that ran out (a trickled body holds nothing for long)."""
    by_body = asyncio.get_running_loop().time() + lim.body_timeout_s
    try:
        async with asyncio.timeout_at(min(by_body, deadline)):
            return await read_limited(chunks, lim.max_body_bytes, budget)
    except ClientDisconnect:
        raise PrismError(ErrorKind.BAD_REQUEST, "the client closed the connection before the whole body arrived",
                         "body") from None
    except TimeoutError:
        if by_body <= deadline:
            raise LIMITS["body_timeout_s"].refusal(lim.body_timeout_s, "body") from None
        raise LIMITS["body_deadline"].refusal(lim.request_timeout_s, "body") from None
