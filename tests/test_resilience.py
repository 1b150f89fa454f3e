"""The parts of serving under failure that need no cluster: which errors are retried, the retry loop,
the wedged-engine health check, and the evidence engine stopping for a cancelled request."""

from __future__ import annotations

import asyncio
import time

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException, ReplicaUnavailableError

from deployments.retries import replica_lost, with_retries
from deployments.threads import ComputeThread, EngineWedged
from prism_ray.engine import EvidenceEngine

QUERY = "What is the boiling point of water at sea level?"


def _task_error(cause: BaseException) -> RayTaskError:
    return RayTaskError("generate", "traceback", cause)


def _wrapped(cause: BaseException) -> RayServeException:
    exc = RayServeException("upstream died")
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize("exc, lost", [
    (ActorDiedError(), True),
    (ActorUnavailableError("unreachable", None), True),
    (ReplicaUnavailableError("r1"), True),
    (_task_error(ActorDiedError()), True),
    (_wrapped(ActorDiedError()), True),
    (_task_error(ValueError("query must be a non-empty string")), False),  # an engine error: same again
    (BackPressureError(num_queued_requests=3, max_queued_requests=2), False),  # saturated: a 503, not a retry
    (ValueError("bad"), False),
])
def test_only_a_lost_replica_is_retried(exc, lost):
    assert replica_lost(exc) is lost


def test_with_retries_sends_again_after_a_lost_replica_and_not_after_an_engine_error():
    calls, retries = [], []

    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ActorDiedError()
        return "ok"

    assert asyncio.run(with_retries(flaky, retries.append, first_delay_s=0.001)) == "ok"
    assert len(calls) == 3 and len(retries) == 2

    async def wrong():
        calls.append(1)
        raise _task_error(ValueError("documents[0] must be a string"))

    calls.clear()
    with pytest.raises(RayTaskError):
        asyncio.run(with_retries(wrong, retries.append, first_delay_s=0.001))
    assert len(calls) == 1


def test_with_retries_is_bounded_by_the_callers_deadline():
    async def always_dead():
        raise ActorDiedError()

    async def main():
        async with asyncio.timeout(0.3):
            await with_retries(always_dead, lambda exc: None, first_delay_s=0.01, max_delay_s=0.05)

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(main())
    assert time.monotonic() - started < 2


def test_check_health_fails_only_while_an_engine_call_runs_past_wedged_after_s():
    compute = ComputeThread(torch_threads=1, wedged_after_s=0.2)

    async def main():
        compute.check()  # idle: healthy
        slow = asyncio.ensure_future(compute.run(time.sleep, 0.6))
        await asyncio.sleep(0.05)
        compute.check()  # busy, but not for long yet
        await asyncio.sleep(0.35)
        with pytest.raises(EngineWedged, match="wedged_after_s=0.2"):
            compute.check()
        await slow
        compute.check()  # the call ended: healthy again

    asyncio.run(main())


def test_evidence_engine_drops_a_stopped_pair_at_the_next_sync(tiny_ckpt):
    engine = EvidenceEngine(tiny_ckpt, dtype="float32")
    pairs = [(QUERY, "Water boils at 100 degrees Celsius at sea level."), (QUERY, "Mount Everest is 8848 m high.")]
    full = engine.generate(pairs, max_new_tokens=40)
    asked = []

    def stop_second(i: int) -> bool:
        asked.append(i)
        return i == 1

    cut = engine.generate(pairs, max_new_tokens=40, should_stop=stop_second)
    assert cut[0] == full[0]  # the other pair is untouched
    assert cut[1].generated_tokens <= 1 + engine.sync_every < full[1].generated_tokens
    assert full[1].text.startswith(cut[1].text)
    assert set(asked) == {0, 1}


def test_readiness_needs_a_running_replica_of_every_tier_that_keeps_one():
    from deployments.router import readiness
    from prism_ray.config import AppConfig

    config = AppConfig.model_validate({"models": [
        {"name": "a", "model": "/m/a", "scorer": {"num_replicas": 2},
         "evidence": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 2}}},
        {"name": "b", "model": "/m/b", "evidence": None}]})
    tiers, missing = readiness(config, {"a-scorer": 1, "b-scorer": 0})
    assert tiers == {"a-scorer": 1, "a-evidence": 0, "b-scorer": 0}
    assert missing == ["b-scorer"]  # a-evidence scales to zero: not required
    assert readiness(config, {"a-scorer": 1, "b-scorer": 1})[1] == []


def test_a_prism_error_survives_pickling_whole():
    """Ray pickles what a replica raises: a PrismError must arrive with its kind, param and headers (the router
    turns a replica's `saturated` into a 503 with Retry-After)."""
    import pickle

    from prism_ray.errors import ErrorKind, PrismError

    err = pickle.loads(pickle.dumps(PrismError(ErrorKind.SATURATED, "full", "evidence", {"Retry-After": "2"})))
    assert (err.kind, err.message, err.param, err.headers, err.status) == (ErrorKind.SATURATED, "full", "evidence",
                                                                           {"Retry-After": "2"}, 503)
