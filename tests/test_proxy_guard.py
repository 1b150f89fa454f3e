"""The body guard Serve's proxy runs (`prism_ray.proxy_guard`), without a cluster: an ASGI app that reads its
body as Serve's proxy does (every message until the body is in) behind the guard, fed by a client that sends
pieces. Through a real proxy: tests/test_serve.py and tests/test_direct_ingress.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from prism_ray.config import LimitsConfig
from prism_ray.proxy_guard import (
    CALLBACK,
    CALLBACK_VARIABLE,
    LIMITS_VARIABLE,
    BodyGuard,
    middlewares,
    proxy_environment,
    proxy_limits,
)


class Client:
    """The client's side of one request: its body in `pieces` (one every `every_s`), then waiting for the
    answer; records what was read of it and what was sent back."""

    def __init__(self, pieces: list[int], every_s: float = 0.0, headers=(), path: str = "/v2/rerank"):
        self.pieces, self.every_s, self.read, self.sent = list(pieces), every_s, 0, []
        self.scope = {"type": "http", "method": "POST", "path": path,
                      "headers": [(k.encode(), v.encode()) for k, v in headers]}

    async def receive(self):
        if not self.pieces:
            await asyncio.sleep(3600)  # the body is in: the client waits for the answer
        await asyncio.sleep(self.every_s)
        n = self.pieces.pop(0)
        self.read += n
        return {"type": "http.request", "body": b"x" * n, "more_body": bool(self.pieces)}

    async def send(self, message):
        self.sent.append(message)

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(next(m["headers"] for m in self.sent if m["type"] == "http.response.start"))

    @property
    def error(self) -> dict:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body"))


def proxy_like_app(took: list):
    """Reads every message as Serve's proxy does, until the body is in, then answers 200 with its byte count;
    records the messages it was given."""

    async def app(scope, receive, send):
        size = 0
        while True:
            message = await receive()
            took.append(message)
            if message["type"] == "http.disconnect":
                return
            size += len(message["body"])
            if not message["more_body"]:
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})

    return app


def guard(app, **limits) -> BodyGuard:
    lim = {"max_body_bytes": 2048, "body_timeout_s": 5.0, "max_in_flight_bytes": 1 << 20, "retry_after_s": 2}
    return BodyGuard(app, routes={"/": LimitsConfig(**{**lim, **limits})})


def run(guarded: BodyGuard, *clients: Client) -> None:
    async def go():
        await asyncio.gather(*(guarded(c.scope, c.receive, c.send) for c in clients))
    asyncio.run(go())


def test_a_body_within_the_limits_reaches_the_app_whole_as_one_message():
    took: list[dict] = []
    client = Client([800, 800, 400])
    run(guard(proxy_like_app(took)), client)
    assert client.status == 200 and client.sent[-1]["body"] == b"2000"
    assert took == [{"type": "http.request", "body": b"x" * 2000, "more_body": False}]


def test_a_chunked_body_past_the_limit_is_413_the_rest_is_never_read_and_the_app_never_called():
    took: list[dict] = []
    client = Client([800] * 100)
    run(guard(proxy_like_app(took)), client)
    assert client.status == 413 and client.read == 2400  # the third piece passed 2048: nothing after it
    assert client.error["type"] == "too_large" and "max_body_bytes" in client.error["message"]
    assert client.headers[b"connection"] == b"close"
    assert took == []


def test_a_declared_length_past_the_limit_is_413_before_a_byte_is_read():
    client = Client([5000], headers=[("content-length", "5000")])
    run(guard(proxy_like_app([])), client)
    assert client.status == 413 and client.read == 0 and "5000" in client.error["message"]


def test_a_trickled_body_is_408_naming_body_timeout_s():
    took: list[dict] = []
    client = Client([10] * 1000, every_s=0.05)
    run(guard(proxy_like_app(took), body_timeout_s=0.3), client)
    assert client.status == 408 and "body_timeout_s=0.3" in client.error["message"]
    assert client.read < 200 and took == []


def test_bodies_past_the_in_flight_budget_are_429_with_retry_after_and_the_budget_comes_back():
    guarded = guard(proxy_like_app([]), max_body_bytes=10_000, max_in_flight_bytes=3000)
    first, second = Client([2000, 100], every_s=0.1), Client([600, 600], every_s=0.06)
    run(guarded, first, second)  # at 0.12 s the two hold 2000 + 1200; the second alone would fit
    assert first.status == 200 and second.status == 429
    assert second.headers[b"retry-after"] == b"2" and "max_in_flight_bytes" in second.error["message"]
    assert guarded.limits_for("/v2/rerank")[1].used == 0
    third = Client([3000])
    run(guarded, third)
    assert third.status == 200


def test_a_client_gone_before_its_body_is_in_is_not_answered():
    class Leaving(Client):
        async def receive(self):
            if self.read >= 1600:
                return {"type": "http.disconnect"}
            return await super().receive()

    took: list[dict] = []
    client = Leaving([800] * 10)
    run(guard(proxy_like_app(took)), client)
    assert client.sent == [] and took == []


def test_after_the_body_the_app_hears_of_a_disconnect():
    class Hanging(Client):
        async def receive(self):
            return await super().receive() if self.pieces else {"type": "http.disconnect"}

    took: list[dict] = []

    async def app(scope, receive, send):
        took.append(await receive())
        took.append(await receive())

    client = Hanging([100])
    asyncio.run(guard(app)(client.scope, client.receive, client.send))
    assert [m["type"] for m in took] == ["http.request", "http.disconnect"]


def test_other_scopes_pass_through():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(guard(app)({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]


def test_each_application_gets_its_own_limits_by_route_prefix():
    routes = {"/": LimitsConfig(max_body_bytes=2048), "/guarded": LimitsConfig(max_body_bytes=1 << 20, body_timeout_s=0.3)}
    guarded = BodyGuard(proxy_like_app([]), routes)
    big, big_guarded, near_miss = (Client([3000]), Client([3000], path="/guarded/v2/rerank"),
                                   Client([3000], path="/guardedx/v2/rerank"))
    slow = Client([10] * 100, every_s=0.05, path="/guarded/v2/rerank")
    run(guarded, big, big_guarded, near_miss, slow)
    assert (big.status, big_guarded.status, near_miss.status) == (413, 200, 413)  # "/guardedx" is under "/"
    assert slow.status == 408 and "body_timeout_s=0.3" in slow.error["message"]
    loosest, _ = BodyGuard(proxy_like_app([]), {"/a": routes["/"], "/b": routes["/guarded"]}).limits_for("/c")
    assert (loosest.max_body_bytes, loosest.body_timeout_s) == (1 << 20, 10)  # a path under no prefix


def test_the_proxy_environment_states_each_routes_limits_and_the_callback_reads_them(monkeypatch):
    env = proxy_environment({"/": LimitsConfig(max_body_bytes=65536, body_timeout_s=1.5),
                             "/b": LimitsConfig(max_in_flight_bytes=1 << 20)})
    assert env[CALLBACK_VARIABLE] == CALLBACK
    limits = proxy_limits(env)
    assert (limits["/"].max_body_bytes, limits["/"].body_timeout_s) == (65536, 1.5)
    assert (limits["/b"].max_body_bytes, limits["/b"].max_in_flight_bytes) == (16 << 20, 1 << 20)
    assert list(proxy_limits({})) == ["/"] and proxy_limits({})["/"] == LimitsConfig()
    monkeypatch.setenv(LIMITS_VARIABLE, json.dumps({"/": {"max_body_bytes": 4096}}))
    (middleware,) = middlewares()
    assert middleware.cls is BodyGuard and middleware.kwargs["routes"]["/"].max_body_bytes == 4096
    monkeypatch.setenv(LIMITS_VARIABLE, json.dumps({"/": {"max_body_bytes": 10}}))
    with pytest.raises(ValueError, match="max_body_bytes"):
        middlewares()
