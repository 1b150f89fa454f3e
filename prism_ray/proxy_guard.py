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

One proxy serves every application of a cluster, so the guard applies each application's own limits to the
paths under its route prefix. It takes them from `PRISM_RAY_PROXY_LIMITS` in the proxy's environment (JSON:
route prefix -> `LimitsConfig` fields; `prism-ray serve` writes it from the config), and `LimitsConfig`'s
defaults for every path without it.
"""

from __future__ import annotations

import asyncio
import json
import os

from prism_ray.body import BodyMeter, ByteBudget, check_declared_length
from prism_ray.config import LimitsConfig
from prism_ray.errors import PrismError
from prism_ray.limits import LIMITS

CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "prism_ray.proxy_guard:middlewares"
LIMITS_VARIABLE = "PRISM_RAY_PROXY_LIMITS"
GUARDED = ("max_body_bytes", "body_timeout_s", "max_in_flight_bytes", "retry_after_s")


class BodyGuard:
    """Pure ASGI middleware: reads a request's whole body before the proxy sees it, under the limits of the
    application whose route prefix the path falls under (`routes`: prefix -> `LimitsConfig`, the longest
    prefix wins; a path under none gets the loosest): `max_body_bytes` (413) and `body_timeout_s` (408) per
    body, `max_in_flight_bytes` (429) over that application's bodies this proxy holds at once. It answers a
    refusal itself, so that a refused body never reaches the router (and is not read further); a body
    within the limits goes on as one message. Other scopes (websockets, lifespan) pass through."""

    def __init__(self, app, routes: dict[str, LimitsConfig]):
        self.app = app
        routes = routes or {"/": LimitsConfig()}
        # longest prefix first, as Serve matches routes
        self.routes = {prefix.rstrip("/"): (lim, ByteBudget(lim.max_in_flight_bytes, lim.retry_after_s))
                       for prefix, lim in sorted(routes.items(), key=lambda item: len(item[0].rstrip("/")),
                                                 reverse=True)}
        loosest = LimitsConfig(**{name: max(getattr(lim, name) for lim in routes.values()) for name in GUARDED})
        self.loosest = (loosest, ByteBudget(loosest.max_in_flight_bytes, loosest.retry_after_s))

    def limits_for(self, path: str) -> tuple[LimitsConfig, ByteBudget]:
        """The limits and the byte budget of the application `path` goes to (Serve's longest-prefix match)."""
        for prefix in self.routes:
            if path == prefix or path.startswith(prefix + "/"):
                return self.routes[prefix]
        return self.loosest

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lim, budget = self.limits_for(scope.get("path", "/"))
        meter = BodyMeter(lim.max_body_bytes, budget)
        try:
            try:
                first = await _body(scope, receive, meter, lim.body_timeout_s)
            except PrismError as exc:
                await _answer(send, exc)
                return
            if first["type"] == "http.disconnect":  # the client left before its body was in: no one to answer
                return
            await self.app(scope, _replay(first, receive), send)
        finally:
            meter.release()


async def _body(scope, receive, meter: BodyMeter, timeout_s: float) -> dict:
    """The whole body as one `http.request` message (or the client's `http.disconnect`), read within
    `timeout_s`; a PrismError past a limit, with nothing more read."""
    check_declared_length(dict(scope.get("headers") or []).get(b"content-length", b"").decode("latin-1"),
                          meter.limit)
    parts = []
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return message
                meter.add(len(message.get("body", b"")))
                parts.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return {"type": "http.request", "body": b"".join(parts), "more_body": False}
    except TimeoutError:
        raise LIMITS["body_timeout_s"].refusal(timeout_s, "body") from None


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


def proxy_limits(environ=os.environ) -> dict[str, LimitsConfig]:
    """The limits per route prefix that `PRISM_RAY_PROXY_LIMITS` states (JSON: prefix -> `LimitsConfig`
    fields; the defaults for fields left out), or the defaults for every path without it."""
    routes = json.loads(environ.get(LIMITS_VARIABLE) or "{}") or {"/": {}}
    return {prefix: LimitsConfig.model_validate(fields) for prefix, fields in routes.items()}


def middlewares() -> list:
    """Serve's proxy callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`): the middlewares it wraps the
    proxy in, here the body guard with `proxy_limits()`."""
    from starlette.middleware import Middleware

    return [Middleware(BodyGuard, routes=proxy_limits())]


def proxy_environment(routes: dict[str, LimitsConfig]) -> dict[str, str]:
    """The variables that put the guard in a proxy that serves applications with these limits (route prefix
    -> the application's `LimitsConfig`): the callback, and each application's guarded limits."""
    stated = {prefix: {name: getattr(lim, name) for name in GUARDED} for prefix, lim in routes.items()}
    return {CALLBACK_VARIABLE: CALLBACK, LIMITS_VARIABLE: json.dumps(stated)}
