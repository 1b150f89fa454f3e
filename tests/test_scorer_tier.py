"""The scorer replica without Ray: a long document runs a piece per engine call, with a short request's
documents between its pieces, and both score as path A."""

from __future__ import annotations

import asyncio
import time

import pytest
import reference
from conftest import english_texts

from prism_ray.config import ModelConfig

QUERY = "What is the boiling point of water at sea level?"


@pytest.fixture(scope="module")
def replica(tiny_ckpt):
    from deployments.scorer import Scorer

    model = ModelConfig.model_validate({
        "name": "prism-tiny", "model": str(tiny_ckpt), "dtype": "float32", "max_length": 1024,
        "scorer": {"engine_token_budget": 128, "max_batch_tokens": 256, "batch_wait_timeout_s": 0,
                   "torch_threads": 1, "max_passed_over": 5}})
    return Scorer.func_or_class(model.model_dump(mode="json"))  # the Serve replica's own constructor


def test_a_short_request_runs_between_the_pieces_of_a_long_document(replica, tiny_ckpt, monkeypatch):
    calls = []
    step = replica.engine.score_step

    def recording(groups):
        calls.append([len(pairs) for _, pairs in groups])
        return step(groups)

    monkeypatch.setattr(replica.engine, "score_step", recording)
    long_doc = " ".join(english_texts(6, 100, 100))
    finished = []

    async def main():
        async def one(name, docs, after_first_call=False):
            while after_first_call and not calls:
                await asyncio.sleep(0.001)
            reply = await replica.score(QUERY, docs)
            finished.append(name)
            return reply

        return await asyncio.gather(one("long", [long_doc]), one("short", ["water boils at 100 C"], True))

    long, short = asyncio.run(main())
    assert finished == ["short", "long"]  # the short one did not wait out the long one's prefill
    assert len(calls) >= 5  # the long document's pieces, one per engine call
    for doc, reply in ((long_doc, long), ("water boils at 100 C", short)):
        ids = reference.prompt_ids(str(tiny_ckpt), QUERY, doc)
        [r] = reply.results
        assert r.num_tokens == len(ids) > (500 if doc is long_doc else 0) and not r.truncated
        assert abs(r.score - reference.path_a(str(tiny_ckpt), ids)["score"]) <= 1e-5
    assert replica._batcher.under_way == 0
    assert replica._batcher.max_passed_over == 5  # the tier's config reaches its batcher


def test_batches_are_sized_by_the_engine_work_not_the_shared_prompt_head(replica, tiny_ckpt, monkeypatch):
    """Every Prism prompt starts with the same head (system prompt, instruction, query), which each row reads
    from a cached state: a request of 12 short documents (about 200 prompt tokens each, a few dozen of them
    the row's own) fills each engine call up to max_batch_tokens (256) of the rows' own tokens, so it takes
    2 or 3 calls, not one per document or two, and scores as path A."""
    calls = []
    step = replica.engine.score_step

    def recording(groups):
        calls.append(sum(replica.engine.row_tokens(prefix, p) for prefix, pairs in groups for p in pairs))
        return step(groups)

    monkeypatch.setattr(replica.engine, "score_step", recording)
    docs = english_texts(12, 3, 8)
    reply = asyncio.run(replica.score(QUERY, docs))
    prefix = replica.engine.prompts.prefix(QUERY)
    pairs = replica.engine.prompts.encode_documents(QUERY, docs, prefix=prefix)
    own = [replica.engine.row_tokens(prefix, p) for p in pairs]
    most = replica.config.scorer.max_batch_tokens
    assert 2 * min(p.num_tokens for p in pairs) > most  # counted by prompt tokens, no two documents share a call
    assert sum(calls) == sum(own) and max(calls) <= most
    assert len(calls) <= 3
    assert all(a + b > most for a, b in zip(calls, calls[1:]))  # each call full: the next could not join it
    for doc, r in zip(docs, reply.results):
        ids = reference.prompt_ids(str(tiny_ckpt), QUERY, doc)
        assert r.num_tokens == len(ids)
        assert abs(r.score - reference.path_a(str(tiny_ckpt), ids)["score"]) <= 1e-5


def test_a_request_scored_in_several_engine_calls_reports_them_all_as_its_compute(replica, monkeypatch):
    """The router's `Server-Timing: scorer;dur=` is this timing: a request whose documents took several engine
    calls computed for all of them, not for its slowest call alone."""
    took = []
    step = replica.engine.score_step

    def slow(groups):  # each call at least 50 ms, so the calls' sum stands well clear of the slowest one
        t0 = time.perf_counter()
        time.sleep(0.05)
        out = step(groups)
        took.append(time.perf_counter() - t0)
        return out

    monkeypatch.setattr(replica.engine, "score_step", slow)
    t0 = time.perf_counter()
    reply = asyncio.run(replica.score(QUERY, english_texts(12, 3, 8)))
    wall_ms = 1000 * (time.perf_counter() - t0)
    assert len(took) >= 2
    assert 1000 * sum(took) <= reply.timing.compute_ms <= wall_ms


def test_the_engine_is_loaded_and_run_on_the_compute_thread_only(tiny_ckpt, monkeypatch):
    """All of a replica's torch work on one thread: libgomp keeps an OpenMP team per thread that starts
    parallel work, and more teams than CPUs make every team sleep between parallel regions
    (deployments/threads.py)."""
    import threading

    import deployments.scorer as scorer_module

    threads = []

    def build(*args):
        threads.append(threading.current_thread())
        return real_build(*args)

    real_build = scorer_module.build_engine
    monkeypatch.setattr(scorer_module, "build_engine", build)
    model = ModelConfig.model_validate({"name": "prism-tiny", "model": str(tiny_ckpt), "dtype": "float32",
                                        "scorer": {"batch_wait_timeout_s": 0, "torch_threads": 1}})
    replica = scorer_module.Scorer.func_or_class(model.model_dump(mode="json"))
    step = replica.engine.score_step
    monkeypatch.setattr(replica.engine, "score_step",
                        lambda groups: threads.append(threading.current_thread()) or step(groups))
    asyncio.run(replica.score(QUERY, ["water boils at 100 C", "the sea is salty"]))
    assert len(threads) >= 2 and len(set(threads)) == 1
    assert threads[0] is not threading.main_thread() and threads[0].name.startswith("prism-compute")
