"""Body limits in Serve's HTTP proxy, before a body is queued for the router.

Serve's proxy reads each request body as fast as the client sends it into a queue of its own, unbounded,
from which the router replica fetches it (`ray/serve/_private/proxy.py`, `proxy_asgi_receive`). The router
refuses a body past `max_body_bytes` (413) or arriving too slowly (408), but by then the proxy may have
read far more: 8 clients sending 64 MiB chunked bodies grew the proxy by 855 MiB (`abuse_serve.py`, README).

`BodyGuard` is an ASGI middleware that Serve wraps around its proxy when `RAY_SERVE_HTTP_PROXY_CALLBACK_
IMPORT_PATH` names `middlewares` below (`prism-ray serve` sets it). It reads each body whole before the proxy
sees it, under the router's own body limits (`prism_ray.body`): a `Content-Length` over `max_body_bytes` is
refused before a byte is read; a body past that limit, or past `body_timeout_s`, or past the proxy's
`max_in_flight_bytes` of bodies at once, is refused there (the router's JSON error, with `Connection: close`)
and nothing more of it is read. A refused body never reaches the router, so neither the proxy's queue nor
the calls that carry it to the router hold it; a body within the limits goes on as one message. The router
keeps its own checks (direct ingress bypasses the proxy).

The guard takes its limits from `PRISM_RAY_PROXY_LIMITS` (JSON: `LimitsConfig` fields) in the proxy's
environment, `LimitsConfig`'s defaults without it. One proxy serves every application of a cluster, so
`proxy_environment` takes the loosest of the applications' limits: the guard never refuses what an
application would accept.
"""

from __future__ import annotations

import asyncio
import json
import os

from prism_ray.body import BodyMeter, ByteBudget, too_large
from prism_ray.config import LimitsConfig
from prism_ray.errors import PrismError
from prism_ray.limits import LIMITS

CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "prism_ray.proxy_guard:middlewares"
LIMITS_VARIABLE = "PRISM_RAY_PROXY_LIMITS"
GUARDED = ("max_body_bytes", "body_timeout_s", "max_in_flight_bytes", "retry_after_s")

class BodyGuard:
    """Pure ASGI middleware: reads a request's whole body before the proxy sees it, under `max_body_bytes`
    (413) and `body_timeout_s` (408) per body and `max_in_flight_bytes` (429) over the bodies this process
    holds at once, and answers a refusal itself, so that a refused body never reaches the router (and is not
    read further). A body within the limits goes on as one message. Other scopes (websockets, lifespan) pass
    through."""

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float, max_in_flight_bytes: int,
                 retry_after_s: int = 1):
        self.app, self.max_body_bytes, self.body_timeout_s = app, max_body_bytes, body_timeout_s
        self.budget = ByteBudget(max_in_flight_bytes, retry_after_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        meter = BodyMeter(self.max_body_bytes, self.budget)
        try:
            try:
                first = await self._body(scope, receive, meter)
            except PrismError as exc:
                await _answer(send, exc)
                return
            if first["type"] == "http.disconnect":  # the client left before its body was in: no one to answer
                return
            await self.app(scope, _replay(first, receive), send)
        finally:
            meter.release()

    async def _body(self, scope, receive, meter: BodyMeter) -> dict:
        """The whole body as one `http.request` message (or the client's `http.disconnect`), read within
        `body_timeout_s`; a PrismError past a limit, with nothing more read."""
        length = dict(scope.get("headers") or []).get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise too_large(length, self.max_body_bytes)
        parts = []
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return message
                    meter.add(len(message.get("body", b"")))
                    parts.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        return {"type": "http.request", "body": b"".join(parts), "more_body": False}
        except TimeoutError:
            raise LIMITS["body_timeout_s"].refusal(self.body_timeout_s, "body") from None


def _replay(first: dict, receive):
    """`receive` that gives `first` (the whole body) once, then what the client sends next (a disconnect)."""
    pending = [first]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


async def _answer(send, exc: PrismError) -> None:
    """The router's JSON error for `exc`, with `Connection: close`: the server stops reading the connection
    (and so the rest of the body) once it is sent."""
    body = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"),
               *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items())]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def proxy_limits(environ=os.environ) -> LimitsConfig:
    """The limits `PRISM_RAY_PROXY_LIMITS` states (JSON), the defaults for the fields it leaves out."""
    return LimitsConfig.model_validate(json.loads(environ.get(LIMITS_VARIABLE) or "{}"))


def middlewares() -> list:
    """Serve's proxy callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`): the middlewares it wraps the
    proxy in, here the body guard with `proxy_limits()`."""
    from starlette.middleware import Middleware

    lim = proxy_limits()
    return [Middleware(BodyGuard, **{name: getattr(lim, name) for name in GUARDED})]


def proxy_environment(limits: list[LimitsConfig]) -> dict[str, str]:
    """The variables that put the guard in a proxy that serves applications with these `limits`: the callback,
    and the loosest of each guarded limit (the largest), so that the guard refuses only what every
    application would refuse too."""
    loosest = {name: max(getattr(lim, name) for lim in limits) for name in GUARDED} if limits else {}
    return {CALLBACK_VARIABLE: CALLBACK, LIMITS_VARIABLE: json.dumps(loosest)}
