"""Body limits in Serve's HTTP proxy, before a body is queued for the router.

Serve's proxy reads each request body as fast as the client sends it into a queue of its own, unbounded,
from which the router replica fetches it (`ray/serve/_private/proxy.py`, `proxy_asgi_receive`). The router
refuses a body past `max_body_bytes` (413) or arriving too slowly (408), but by then the proxy may have
read far more: 8 clients sending 64 MiB chunked bodies grew the proxy by 855 MiB (`abuse_serve.py`, README).

`BodyGuard` is an ASGI middleware that Serve wraps around its proxy when `RAY_SERVE_HTTP_PROXY_CALLBACK_
IMPORT_PATH` names `middlewares` below (`prism-ray serve` sets it). It applies the router's own body limits
(`prism_ray.body`) to what the proxy reads: a `Content-Length` over `max_body_bytes` is refused before a
byte is read; past the limit, or past `body_timeout_s`, or past the proxy's `max_in_flight_bytes` of bodies
at once, the guard answers the error itself (the same JSON as the router's, with `Connection: close`) and
tells the proxy that the client has gone, so it reads nothing more and cancels the call to the router. A
body within the limits passes untouched; the router keeps its own checks (direct ingress bypasses the proxy).

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

DISCONNECT = {"type": "http.disconnect"}


class BodyGuard:
    """Pure ASGI middleware: `max_body_bytes` (413) and `body_timeout_s` (408) per body, `max_in_flight_bytes`
    (429) over the bodies this process holds at once. Other scopes (websockets, lifespan) pass through."""

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float, max_in_flight_bytes: int,
                 retry_after_s: int = 1):
        self.app, self.max_body_bytes, self.body_timeout_s = app, max_body_bytes, body_timeout_s
        self.budget = ByteBudget(max_in_flight_bytes, retry_after_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(self, receive, send)
        try:
            length = dict(scope.get("headers") or []).get(b"content-length", b"").decode("latin-1")
            if length.isdigit() and int(length) > self.max_body_bytes:
                await exchange.refuse(too_large(length, self.max_body_bytes))
                return
            await self.app(scope, exchange.receive, exchange.send)
        finally:
            exchange.meter.release()


class _Exchange:
    """One request through the guard: its body's meter and deadline, and whether the app or the guard has
    begun the answer (the guard answers only if the app has not; once it has, the app's messages are dropped)."""

    def __init__(self, guard: BodyGuard, receive, send):
        self.guard, self._receive, self._send = guard, receive, send
        self.meter = BodyMeter(guard.max_body_bytes, guard.budget)
        self.by = asyncio.get_running_loop().time() + guard.body_timeout_s
        self.body_in = self.cut = self.app_answering = self.guard_answered = False

    async def receive(self):
        if self.cut:
            return DISCONNECT
        if self.body_in:  # after the body, the proxy only waits here to learn of a disconnect
            return await self._receive()
        try:
            async with asyncio.timeout_at(self.by):
                message = await self._receive()
        except TimeoutError:
            return await self.refuse(LIMITS["body_timeout_s"].refusal(self.guard.body_timeout_s, "body"))
        if message["type"] == "http.request":
            try:
                self.meter.add(len(message.get("body", b"")))
            except PrismError as exc:
                return await self.refuse(exc)
            self.body_in = not message.get("more_body", False)
        return message

    async def send(self, message) -> None:
        if self.guard_answered:
            return
        if message["type"] == "http.response.start":
            self.app_answering = True
        await self._send(message)

    async def refuse(self, exc: PrismError) -> dict:
        """Answer `exc` unless the app has begun its own answer; either way, stop reading the body: the app is
        told that the client has gone (and so cancels its call to the router)."""
        self.cut = True
        if not (self.app_answering or self.guard_answered):
            self.guard_answered = True  # set before the first await: the app's messages are dropped from now
            body = json.dumps(exc.body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close"),
                       *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items())]
            await self._send({"type": "http.response.start", "status": exc.status, "headers": headers})
            await self._send({"type": "http.response.body", "body": body})
        return DISCONNECT


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
