"""The evidence scheduler: pairs join a running decode between steps, leave at their own end, and it is bounded."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest
import reference
from conftest import CHINESE, english_texts

from prism_ray.engine import EvidenceEngine, QueueFull, Scheduler, SchedulerClosed

QUERY = "What is the boiling point of water at sea level?"


@pytest.fixture(scope="module")
def engines(tiny_ckpt, qwen3_ckpt):
    return {str(p): EvidenceEngine(p, dtype="float32") for p in (tiny_ckpt, qwen3_ckpt)}


@pytest.fixture
def engine(engines, tiny_ckpt):
    e = engines[str(tiny_ckpt)]
    saved = e.sync_every
    yield e
    e.sync_every = saved


def _wait_until(condition, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def _recording_admissions(engine, scheduler, monkeypatch) -> list[tuple[set[int], set[int]]]:
    """Per prefill round: the sequences admitted and the ones decoding at that moment (by id)."""
    rounds = []
    original = engine._prefill

    def prefill(seqs):
        rounds.append(({id(s) for s in seqs}, {id(s) for s in scheduler._loop.active}))
        return original(seqs)

    monkeypatch.setattr(engine, "_prefill", prefill)
    return rounds


@pytest.mark.slow  # path A greedy generation for every pair
def test_pairs_joining_a_running_decode_write_path_a_text(engines, any_ckpt, monkeypatch):
    """Two slots; a long pair decodes while shorter ones with other limits (and another query) join and leave
    around it. Every pair writes path A's greedy text for its own max_new_tokens, in float32."""
    engine = engines[str(any_ckpt)]
    monkeypatch.setattr(engine, "sync_every", 4)
    scheduler = Scheduler(engine, max_active_pairs=2, max_queued_pairs=8)
    rounds = _recording_admissions(engine, scheduler, monkeypatch)
    docs = english_texts(3, 10, 120)
    try:
        long = scheduler.submit(QUERY, docs[0], max_new_tokens=28)
        short = scheduler.submit(QUERY, docs[1], max_new_tokens=5)
        _wait_until(lambda: len(long.seq.tokens) >= 5)  # the long one is decoding
        joined = [scheduler.submit(QUERY, docs[2], max_new_tokens=9), scheduler.submit("沸点", CHINESE[1], max_new_tokens=13)]
        handles = [(long, docs[0], 28), (short, docs[1], 5), (joined[0], docs[2], 9), (joined[1], CHINESE[1], 13)]
        results = [(h.result(120), doc, n) for h, doc, n in handles]
    finally:
        scheduler.close()
    for h in joined:  # admitted while the long pair was decoding
        assert any(id(h.seq) in admitted and id(long.seq) in active for admitted, active in rounds)
    for (r, doc, n), h in zip(results, [h for h, _, _ in handles]):
        ref = reference.path_a(str(any_ckpt), reference.prompt_ids(str(any_ckpt), h.seq.query, doc), max_new_tokens=n)
        assert r.text == ref["text"], doc
        assert abs(r.score - ref["score"]) <= 1e-5
        assert r.generated_tokens == n  # random weights rarely emit end of turn


def test_a_full_scheduler_refuses_at_once_and_takes_pairs_again_once_they_leave(engine):
    scheduler = Scheduler(engine, max_active_pairs=1, max_queued_pairs=1)
    try:
        held = [scheduler.submit(QUERY, d, max_new_tokens=400) for d in ("one", "two")]
        with pytest.raises(QueueFull, match="max_active_pairs=1 and max_queued_pairs=1"):
            scheduler.submit(QUERY, "three", max_new_tokens=4)
        for h in held:
            h.cancel()
        _wait_until(lambda: scheduler.active == 0 and scheduler.queued == 0)
        assert scheduler.submit(QUERY, "three", max_new_tokens=4).result(60).generated_tokens == 4
    finally:
        scheduler.close()


def test_a_cancelled_pair_frees_its_slot_for_a_waiting_one(engine):
    scheduler = Scheduler(engine, max_active_pairs=1, max_queued_pairs=4)
    try:
        long = scheduler.submit(QUERY, "a long answer", max_new_tokens=400)
        short = scheduler.submit(QUERY, "a short one", max_new_tokens=4)
        _wait_until(lambda: len(long.seq.tokens) >= 3)
        assert scheduler.active == 1 and scheduler.queued == 1  # the short one waits for the only slot
        long.cancel()
        assert short.result(60).generated_tokens == 4
        with pytest.raises(concurrent.futures.CancelledError):
            long.result(1)
        assert len(long.seq.tokens) < 400  # it stopped decoding when cancelled
        waiting = scheduler.submit(QUERY, "never admitted", max_new_tokens=400)
        waiting.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            waiting.result(1)
    finally:
        scheduler.close()


def test_text_arrives_in_pieces_that_make_the_answer(engine):
    engine.sync_every = 4
    scheduler = Scheduler(engine, max_active_pairs=2, stream_interval_s=0)
    seen: list[str] = []
    try:
        async def follow():
            handle = scheduler.submit(QUERY, "water boils at 100 degrees", max_new_tokens=24, on_text=seen.append)
            pieces = [p async for p in handle.deltas()]
            return pieces, await handle

        pieces, result = asyncio.run(follow())
    finally:
        scheduler.close()
    assert len(pieces) > 2 and all(pieces)
    assert "".join(pieces) == result.text and "".join(seen) == result.text


def test_a_listener_that_raises_is_dropped_and_every_pair_still_finishes(engine):
    """A text callback that raises runs on the loop's thread: it loses its text, but neither its own pair's
    result nor a pair decoding beside it is lost, and the scheduler takes pairs afterwards."""
    engine.sync_every = 4
    scheduler = Scheduler(engine, max_active_pairs=2, stream_interval_s=0)
    calls = []

    def broken(piece: str) -> None:
        calls.append(piece)
        raise RuntimeError("listener bug")

    try:
        bad = scheduler.submit(QUERY, "water boils at 100 degrees", max_new_tokens=24, on_text=broken)
        good = scheduler.submit(QUERY, "the sea is salty", max_new_tokens=24)
        bad_text, good_text = bad.result(120).text, good.result(120).text
        after = scheduler.submit(QUERY, "ice melts at 0 degrees", max_new_tokens=8).result(120)
    finally:
        scheduler.close()
    assert len(calls) == 1  # dropped after its first failure
    assert bad_text == engine.generate([(QUERY, "water boils at 100 degrees")], max_new_tokens=24)[0].text
    assert good_text == engine.generate([(QUERY, "the sea is salty")], max_new_tokens=24)[0].text
    assert after.text


def test_text_pieces_are_at_least_stream_interval_apart(engine):
    """With a stream interval, pieces come no faster than it (the first at once, the rest gathered), and
    they still make the whole answer."""
    engine.sync_every = 1
    scheduler = Scheduler(engine, max_active_pairs=2, stream_interval_s=0.2)
    try:
        async def follow():
            handle = scheduler.submit(QUERY, "water boils at 100 degrees", max_new_tokens=48)
            pieces = [(time.monotonic(), p) async for p in handle.deltas()]
            return pieces, await handle

        pieces, result = asyncio.run(follow())
    finally:
        scheduler.close()
    assert "".join(p for _, p in pieces) == result.text and result.generated_tokens > len(pieces)
    gaps = [b - a for (a, _), (b, _) in zip(pieces[:-2], pieces[1:-1])]  # the last piece comes at the end
    assert all(g >= 0.15 for g in gaps), gaps


def test_only_the_last_partial_character_is_held_back():
    """Text ending in U+FFFD may end in a partial character, which decodes as one U+FFFD: that one waits for
    its next bytes; earlier ones can no longer complete and are passed on, so a model writing invalid bytes
    still streams."""
    from prism_ray.engine.scheduler import GenerationHandle

    seen: list[str] = []
    handle = GenerationHandle(None, None, seen.append)
    for text in ["a\ufffd", "a\ufffd\ufffd", "a\ufffd\ufffd\ufffd", "a\ufffd\ufffd\u00e9"]:
        handle._publish(text)
    handle._publish("a\ufffd\ufffd\u00e9!", final=True)
    assert seen == ["a", "\ufffd", "\ufffd", "\u00e9", "!"]


def test_greedy_and_sampled_pairs_share_steps_and_sampling_follows_its_own_seed(engine):
    scheduler = Scheduler(engine, max_active_pairs=4)
    try:
        greedy = scheduler.submit(QUERY, "water", max_new_tokens=12)
        sampled = scheduler.submit(QUERY, "water", max_new_tokens=12, temperature=0.8, seed=5)
        other = scheduler.submit(QUERY, "steam", max_new_tokens=3, temperature=1.5, seed=1)
        together = sampled.result(60)
        alone = scheduler.submit(QUERY, "water", max_new_tokens=12, temperature=0.8, seed=5).result(60)
        assert greedy.result(60).text == engine.generate([(QUERY, "water")], max_new_tokens=12)[0].text
        assert other.result(60).generated_tokens == 3
    finally:
        scheduler.close()
    assert together.text == alone.text  # what shares its batch does not change a seeded sample


def test_a_failed_step_fails_its_pairs_and_the_loop_goes_on(engine, monkeypatch):
    original = engine._decode
    calls = []

    def once_broken(active, pool, *graphs):
        calls.append(len(active))
        if len(calls) == 1:
            raise RuntimeError("a kernel failed")
        return original(active, pool, *graphs)

    monkeypatch.setattr(engine, "_decode", once_broken)
    scheduler = Scheduler(engine, max_active_pairs=2)
    try:
        with pytest.raises(RuntimeError, match="a kernel failed"):
            scheduler.submit(QUERY, "water", max_new_tokens=6).result(60)
        assert scheduler.submit(QUERY, "water", max_new_tokens=6).result(60).generated_tokens == 6
        scheduler.check(wedged_after_s=60)  # healthy
        assert scheduler.active == 0
    finally:
        scheduler.close()


def test_health_check_fails_while_one_step_is_stuck(engine, monkeypatch):
    release = threading.Event()
    original = engine._decode

    def stuck(active, pool, *graphs):
        release.wait(60)
        return original(active, pool, *graphs)

    monkeypatch.setattr(engine, "_decode", stuck)
    scheduler = Scheduler(engine, max_active_pairs=1)
    try:
        handle = scheduler.submit(QUERY, "water", max_new_tokens=3)
        _wait_until(lambda: scheduler.active == 1)
        time.sleep(0.2)
        with pytest.raises(RuntimeError, match="wedged_after_s=0.1"):
            scheduler.check(wedged_after_s=0.1)
        release.set()
        assert handle.result(60).generated_tokens == 3
        scheduler.check(wedged_after_s=0.1)
    finally:
        release.set()
        scheduler.close()


def test_bad_pairs_are_refused_at_submit_and_a_closed_scheduler_takes_none(engine):
    scheduler = Scheduler(engine, max_active_pairs=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        scheduler.submit(QUERY, "d", max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        scheduler.submit(QUERY, "d", temperature=-1)
    with pytest.raises(ValueError, match="query must be a non-empty string"):
        scheduler.submit("", "d")
    pending = scheduler.submit(QUERY, "d", max_new_tokens=400)
    scheduler.close()
    with pytest.raises((SchedulerClosed, concurrent.futures.CancelledError)):
        pending.result(5)
    with pytest.raises(SchedulerClosed):
        scheduler.submit(QUERY, "d")
    with pytest.raises(ValueError, match="max_active_pairs"):
        Scheduler(engine, max_active_pairs=0)


def test_a_bucket_submitted_at_once_fills_an_idle_pool_in_one_round_and_a_bad_pair_fails_alone(engine, monkeypatch):
    scheduler = Scheduler(engine, max_active_pairs=4, max_queued_pairs=None)
    rounds = _recording_admissions(engine, scheduler, monkeypatch)
    pairs = [(QUERY, d) for d in english_texts(5, 5, 60)] + [(QUERY, 7)]
    try:
        handles = scheduler.submit_many(pairs, max_new_tokens=6)
        with pytest.raises(ValueError, match=r"documents\[0\] must be a string"):
            handles[-1].result(1)
        results = [h.result(60) for h in handles[:-1]]
    finally:
        scheduler.close()
    assert len(rounds[0][0]) == 4 and not rounds[0][1]  # four slots filled at once, the fifth waited for one
    assert [r.text for r in results] == [r.text for r in engine.generate(pairs[:-1], max_new_tokens=6)]
    bounded = Scheduler(engine, max_active_pairs=1, max_queued_pairs=1)
    try:
        with pytest.raises(QueueFull):
            bounded.submit_many(pairs[:3], max_new_tokens=2)  # all or none
        assert bounded.queued == 0
    finally:
        bounded.close()


def test_a_built_engine_is_loaded_warmed_and_run_on_the_loop_thread(tiny_ckpt):
    """Given a function, the scheduler builds the engine (and its slot pool) on its own loop thread, the one
    thread that then runs every step: one OpenMP team per process (Scheduler's docstring). A build that fails
    raises from the constructor."""
    seen = []

    def build():
        seen.append(threading.current_thread())
        engine = EvidenceEngine(tiny_ckpt, dtype="float32")
        step = engine._prefill
        engine._prefill = lambda seqs: seen.append(threading.current_thread()) or step(seqs)
        return engine

    scheduler = Scheduler(build, max_active_pairs=2)
    try:
        doc = "Water boils at 100 degrees Celsius at sea level."
        result = scheduler.submit(QUERY, doc, max_new_tokens=8).result(timeout=120)
        assert len(seen) >= 2 and set(seen) == {scheduler._thread} and seen[0] is not threading.current_thread()
        assert result.text == scheduler.engine.generate([(QUERY, doc)], max_new_tokens=8)[0].text
    finally:
        scheduler.close()

    def broken():
        raise FileNotFoundError("no checkpoint at /nowhere")

    with pytest.raises(FileNotFoundError, match="/nowhere"):
        Scheduler(broken)
