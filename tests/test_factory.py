"""One factory for Serve tiers and batch actors: same config, same engine settings."""

from __future__ import annotations

import pytest
import torch

from prism_ray.config import AppConfig, ModelConfig
from prism_ray.factory import build_engine, deployment_name, engine_settings, pin_checkpoint


def _model(tiny_ckpt, **kw):
    return ModelConfig.model_validate({
        "name": "prism-tiny", "model": str(tiny_ckpt), "dtype": "float32", "max_length": 384,
        "scorer": {"engine_token_budget": 777, "torch_threads": 1},
        "evidence": {"max_active_pairs": 3, "torch_threads": 1}, **kw})


def test_deployment_names():
    assert deployment_name("prism-0.8b", "scorer") == "prism-0.8b-scorer"
    assert deployment_name("prism-0.8b", "evidence") == "prism-0.8b-evidence"
    with pytest.raises(ValueError, match="unknown tier"):
        deployment_name("m", "router")


@pytest.mark.slow  # builds a checkpoint
def test_pin_checkpoint_builds_once_and_makes_the_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = ModelConfig(name="t", model="ckpts/tiny", build_preset="tiny")
    assert pin_checkpoint(m).model == str(tmp_path / "ckpts" / "tiny")
    assert (tmp_path / "ckpts/tiny/config.json").is_file()
    hub = ModelConfig(name="h", model="infgrad/Prism-Qwen3.5-Reranker-0.8B")
    assert pin_checkpoint(hub).model == "infgrad/Prism-Qwen3.5-Reranker-0.8B"


@pytest.mark.slow  # loads four engines
def test_a_batch_evidence_actor_and_a_serve_evidence_replica_build_the_same_engine(tiny_ckpt):
    from deployments.evidence import Evidence
    from deployments.scorer import Scorer
    from prism_ray.data.backends import EngineBackend

    model = _model(tiny_ckpt)
    replica = Evidence.func_or_class(model.model_dump(mode="json"))  # the Serve replica's own constructor
    actor = EngineBackend(model, "evidence")  # what a batch EvidenceActor holds
    for engine in (replica.engine, actor.evidence):
        assert engine.warm_up_s > 0  # built warm: one real call before the first request
        assert engine.settings == engine_settings(model, "evidence")
        assert engine.max_batch_size == 3 and engine.loaded.dtype == torch.float32
        assert engine.prompts.max_length == 384
    for scheduler in (replica.scheduler, actor.scheduler):  # the one decode loop both hosts run
        assert scheduler.engine in (replica.engine, actor.evidence) and scheduler.max_active_pairs == 3
    assert replica.scheduler.max_queued_pairs == 64 and actor.scheduler.max_queued_pairs is None
    scorer_replica = Scorer.func_or_class(model.model_dump(mode="json"))
    scorer_actor = EngineBackend(model, "scorer")
    for engine in (scorer_replica.engine, scorer_actor.scorer):
        assert engine.settings == engine_settings(model, "scorer") and engine.token_budget == 777
        assert engine.warm_up_s > 0
    unset = ModelConfig(name="t", model=str(tiny_ckpt), dtype="float32")
    assert build_engine(unset, "scorer").token_budget == 1024  # the CPU default when the config is silent


def test_evidence_tier_refuses_old_batching_fields_naming_the_scheduler_limits():
    from pydantic import ValidationError

    for old in ("max_batch_pairs", "max_batch_tokens", "batch_wait_timeout_s"):
        with pytest.raises(ValidationError, match=f"{old} .*max_active_pairs .*max_queued_pairs"):
            AppConfig.model_validate({"models": [{"name": "a", "model": "/m/a", "evidence": {old: 8}}]})
    with pytest.raises(ValidationError, match="use max_query_chars"):
        AppConfig.model_validate({"models": [{"name": "a", "model": "/m/a"}], "limits": {"max_query_tokens": 9}})


def test_evidence_limits_default_the_same_with_or_without_the_block_and_size_serve_ongoing_requests():
    without = ModelConfig(name="a", model="/m/a")
    with_block = ModelConfig.model_validate({"name": "a", "model": "/m/a", "evidence": {"num_replicas": 2}})
    for ev in (without.evidence, with_block.evidence):
        assert (ev.max_active_pairs, ev.max_queued_pairs, ev.max_ongoing_requests, ev.max_queued_requests) == (16, 64, 80, 64)
    sized = ModelConfig.model_validate({"name": "a", "model": "/m/a",
                                        "evidence": {"max_active_pairs": 4, "max_queued_pairs": 2}})
    assert sized.evidence.max_ongoing_requests == 6  # Serve sends a replica what its scheduler may hold
    assert sized.evidence.max_queued_requests == 2
    explicit = ModelConfig.model_validate({"name": "a", "model": "/m/a", "evidence": {"max_ongoing_requests": 3}})
    assert explicit.evidence.max_ongoing_requests == 3


@pytest.mark.slow  # loads an engine, generates
def test_a_batch_evidence_actor_retries_a_pair_whose_step_failed_on_the_loop_thread(tiny_ckpt, monkeypatch):
    """A decode step that fails fails its pairs; the actor tries each again alone, through the same decode
    loop (so no other thread runs the engine), and gets the text the engine writes for it."""
    import threading

    from prism_ray.data.backends import EngineBackend

    actor = EngineBackend(_model(tiny_ckpt), "evidence")
    pairs = [("What is water?", "Water is H2O."), ("What is water?", "Paris is in France.")]
    expected = [r.text for r in actor.evidence.generate(pairs, max_new_tokens=6)]
    loop, steps = actor.scheduler._loop, []
    real_step = loop.step

    def step():
        steps.append(threading.current_thread())
        if len(steps) == 1:
            raise RuntimeError("a broken step")
        return real_step()

    monkeypatch.setattr(loop, "step", step)
    out = actor.generate(pairs, max_new_tokens=6, temperature=0.0)
    assert [r.text for r in out] == expected
    assert len(steps) >= 3 and set(steps) == {actor.scheduler._thread}


@pytest.mark.slow  # loads an engine
def test_a_batch_score_actor_loads_and_runs_its_engine_on_one_thread(tiny_ckpt, monkeypatch):
    """Ray Data builds an actor on its main thread and calls it on another; the engine is loaded and run on
    the backend's own thread whichever thread calls (EngineBackend's docstring)."""
    import threading

    import prism_ray.data.backends as backends
    from prism_ray.engine import ScoreEngine

    seen = []

    def recording(fn):
        return lambda *a, **kw: seen.append(threading.current_thread()) or fn(*a, **kw)

    monkeypatch.setattr(backends, "build_engine", recording(backends.build_engine))
    monkeypatch.setattr(ScoreEngine, "score", recording(ScoreEngine.score))
    actor = backends.EngineBackend(_model(tiny_ckpt), "scorer")
    here = actor.score([("What is water?", ["Water is H2O."])])
    elsewhere = []
    caller = threading.Thread(target=lambda: elsewhere.append(actor.score([("What is water?", ["Water is H2O."])])))
    caller.start()
    caller.join()
    assert here == elsewhere[0]
    assert len(seen) >= 3 and len(set(seen)) == 1 and seen[0].name.startswith("prism-compute")  # build, 2 calls
