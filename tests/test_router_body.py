"""What the router reads of a body, without a cluster: limits whatever the framing, 4xx for malformed JSON,
API keys compared in constant time."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.exceptions import RequestValidationError

from deployments.router import key_matches, parse_json_object, read_limited
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


@pytest.mark.parametrize("raw, needle", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"query": "q", "documents": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"query": "\xff\xfe"}', "not valid JSON"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
])
def test_malformed_bodies_are_422_naming_the_problem(raw, needle):
    with pytest.raises(RequestValidationError) as err:
        parse_json_object(raw)
    (problem,) = err.value.errors()
    assert problem["loc"] == ("body",) and needle in problem["msg"]


def test_keys_match_exactly():
    keys = ["alpha-key", "beta-key"]
    assert key_matches("beta-key", keys) and key_matches("alpha-key", keys)
    for wrong in ("", "beta-ke", "beta-key2", "BETA-KEY", "alpha-key beta-key"):
        assert not key_matches(wrong, keys)
    assert not key_matches("x", [])
