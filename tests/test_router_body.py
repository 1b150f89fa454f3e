"""What the router reads of a body, without a cluster: limits whatever the framing, 4xx for malformed JSON,
API keys compared in constant time."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.exceptions import RequestValidationError

from deployments.router import key_matches, parse_json_object
from prism_ray.body import ByteBudget, read_body, read_limited
from prism_ray.config import LimitsConfig
from prism_ray.errors import ErrorKind, PrismError


def _pieces(sizes, seen):
    async def gen():
        for n in sizes:
            seen.append(n)
            yield b"x" * n
    return gen()


def test_a_body_past_the_limit_is_refused_without_reading_the_rest():
    seen: list[int] = []
    with pytest.raises(PrismError) as err:
        asyncio.run(read_limited(_pieces([600, 600, 600, 600], seen), 1000))
    assert err.value.kind == ErrorKind.TOO_LARGE and err.value.status == 413
    assert "max_body_bytes" in err.value.message and err.value.param == "body"
    assert seen == [600, 600]  # stopped at the piece that passed the limit
    assert asyncio.run(read_limited(_pieces([500, 500], []), 1000)) == b"x" * 1000  # at the limit: read whole


def test_body_bytes_are_held_against_the_budget_as_they_arrive():
    budget = ByteBudget(limit=1500, retry_after_s=3)
    first = asyncio.run(read_limited(_pieces([500, 500], []), 10_000, budget))
    assert len(first) == 1000 and budget.used == 1000  # held by the caller until its request ends
    seen: list[int] = []
    with pytest.raises(PrismError) as err:
        asyncio.run(read_limited(_pieces([300, 300, 300], seen), 10_000, budget))
    assert err.value.kind == ErrorKind.OVERLOAD and err.value.status == 429
    assert "max_in_flight_bytes" in err.value.message and err.value.headers["Retry-After"] == "3"
    assert seen == [300, 300] and budget.used == 1000  # the refused body's bytes are given back
    with pytest.raises(PrismError):  # so is a body refused for its size
        asyncio.run(read_limited(_pieces([400, 400], []), 600, budget))
    assert budget.used == 1000
    budget.give(len(first))
    assert asyncio.run(read_limited(_pieces([700, 700], []), 10_000, budget)) and budget.used == 1400


def _trickle(pieces: int, every_s: float):
    async def gen():
        for _ in range(pieces):
            await asyncio.sleep(every_s)
            yield b" "
    return gen()


@pytest.mark.parametrize("body_timeout_s, request_timeout_s, names", [
    (0.3, 60, "body_timeout_s=0.3"), (30, 0.3, "request_timeout_s=0.3")])
def test_a_trickled_body_is_408_at_the_first_limit_that_runs_out(body_timeout_s, request_timeout_s, names):
    lim = LimitsConfig(body_timeout_s=body_timeout_s, request_timeout_s=request_timeout_s)
    budget = ByteBudget(lim.max_in_flight_bytes, 1)

    async def go():
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(PrismError) as err:
            await read_body(_trickle(1000, 0.05), lim, budget, started + request_timeout_s)
        return err.value, loop.time() - started

    err, took = asyncio.run(go())
    assert err.kind == ErrorKind.BODY_TIMEOUT and err.status == 408 and names in err.message
    assert 0.25 < took < 2 and budget.used == 0
    assert asyncio.run(read_body(_trickle(3, 0.01), lim, budget, 1e12)) == b"   "


@pytest.mark.parametrize("raw, needle", [
    (b"[" * 100_000 + b"]" * 100_000, "nested more than 32 levels"),
    (b'{"query": "q", "documents": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested more than 32 levels"),
    (b'{"query": "q", "documents": ' + b"[" * 40 + b"]" * 40 + b"}", "nested more than 32 levels deep (max_json_depth)"),
    (b'{"top_n": ' + b"9" * 5000 + b"}", "5000 digits is out of range"),
    (b'{"min_score": 1e999}', "out of range"),
    (b'{"min_score": NaN}', "NaN is not a JSON number"),
    (b'{"min_score": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"query": "\xff\xfe"}', "not valid JSON"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
])
def test_malformed_bodies_are_422_naming_the_problem(raw, needle):
    with pytest.raises(RequestValidationError) as err:
        parse_json_object(raw)
    (problem,) = err.value.errors()
    assert problem["loc"] == ("body",) and needle in problem["msg"]


def test_bodies_within_the_rules_parse():
    assert parse_json_object(b'{"a": [[{"b": 1}]], "n": -' + b"9" * 4300 + b', "f": 1.5e300}') == {
        "a": [[{"b": 1}]], "n": -int("9" * 4300), "f": 1.5e300}
    deep = b'{"x": ' + b"[" * 31 + b"]" * 31 + b"}"  # 32 levels, the object included
    assert parse_json_object(deep) and parse_json_object(deep.replace(b"[", b"[[", 1).replace(b"]", b"]]", 1), 40)


def test_keys_match_exactly():
    keys = ["alpha-key", "beta-key"]
    assert key_matches("beta-key", keys) and key_matches("alpha-key", keys)
    for wrong in ("", "beta-ke", "beta-key2", "BETA-KEY", "alpha-key beta-key"):
        assert not key_matches(wrong, keys)
    assert not key_matches("x", [])
