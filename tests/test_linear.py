"""Float32 projections through oneDNN inside the engines' scope (prism_ray/engine/linear.py)."""

from __future__ import annotations

import pytest
import reference
import torch
import torch.nn.functional as F
from conftest import english_texts

from prism_ray.engine import EvidenceEngine, ScoreEngine, linear, load_model
from prism_ray.engine.linear import EngineLinear
from prism_ray.engine.scope import engine_kernels


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32, bias=False)).to(dtype)


@pytest.fixture
def forced(monkeypatch):
    def force(value):
        monkeypatch.setenv("PRISM_RAY_LINEAR", value)
        linear.choose.cache_clear()
    yield force
    linear.choose.cache_clear()


def test_inside_the_scope_it_is_float32_close_and_outside_it_is_f_linear(forced):
    forced("onednn")
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 7, 64)
    before = model(x)
    assert linear.install(model)
    assert all(type(m) is EngineLinear for m in model if isinstance(m, torch.nn.Linear))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # no weight touched
    calls = []
    real = linear._onednn
    try:
        linear._onednn = lambda *a: calls.append(1) or real(*a)
        assert torch.equal(model(x), before)  # outside the scope: F.linear itself
        assert not calls
        with engine_kernels():
            inside = model(x)
        assert len(calls) == 2
    finally:
        linear._onednn = real
    torch.testing.assert_close(inside, before, atol=1e-5, rtol=1e-5)
    assert not torch.equal(inside, torch.zeros_like(inside))


def test_bf16_models_and_other_input_dtypes_keep_f_linear(forced):
    forced("onednn")
    assert not linear.install(_model(torch.bfloat16))
    model = _model()
    assert linear.install(model)
    x = torch.randn(3, 64, dtype=torch.float64)
    model.double()
    with engine_kernels():
        out = model(x)  # a float64 input never reaches oneDNN's float32 operator
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.linear(F.gelu(F.linear(x, model[0].weight, model[0].bias)), model[2].weight))


def test_forcing_torch_keeps_the_layers(forced):
    forced("torch")
    model = _model()
    assert not linear.install(model)
    assert all(type(m) is torch.nn.Linear for m in model if isinstance(m, torch.nn.Linear))


def test_a_bad_setting_is_named(forced):
    forced("mkl")
    with pytest.raises(ValueError, match="PRISM_RAY_LINEAR must be auto, onednn or torch, not 'mkl'"):
        linear.install(_model())


def test_onednn_is_chosen_only_when_clearly_faster_at_every_row_count():
    assert linear.decide([(8, 1.0, 0.5), (256, 10.0, 4.0)]) == "onednn"
    assert linear.decide([(8, 1.0, 0.5), (256, 10.0, 9.5)]) == "torch"  # within the margin at 256 rows
    assert linear.decide([(8, 0.5, 1.0), (256, 10.0, 4.0)]) == "torch"
    assert linear.decide([]) == "torch"


def test_auto_measures_and_logs_its_choice(forced, caplog):
    forced("auto")
    with caplog.at_level("INFO", logger="prism_ray"):
        chosen = linear.choose(96, 64)
    assert chosen in ("onednn", "torch")
    assert f"float32 CPU projections: {chosen} (8 rows: F.linear" in caplog.text


def test_engines_on_onednn_equal_path_a_on_the_same_gemm(forced, any_ckpt):
    """Score parity (1e-5) and identical greedy text, against path A run with oneDNN's float32 GEMM."""
    forced("onednn")
    loaded = load_model(any_ckpt, dtype="float32")
    assert type(loaded.model.lm_head) is EngineLinear
    query = "What is the boiling point of water at sea level?"
    docs = ["Water boils at 100 C (212 F) at sea level."] + english_texts(4, 20, 150)
    scores = ScoreEngine(loaded).score_pairs(query, docs)
    answers = EvidenceEngine(loaded).generate([(query, d) for d in docs], max_new_tokens=12)
    with reference.onednn_gemm():
        refs = [reference.path_a(str(any_ckpt), reference.prompt_ids(str(any_ckpt), query, d), max_new_tokens=12)
                for d in docs]
    for doc, s, a, r in zip(docs, scores, answers, refs):
        assert abs(s.score - r["score"]) <= 1e-5, doc
        assert a.text == r["text"], doc
    assert max(s.logit for s in scores) - min(s.logit for s in scores) > 0.1  # the scores depend on the input


def test_the_benchmarks_swap_of_f_linear_is_undone(monkeypatch):
    calls = []
    real = linear._onednn
    monkeypatch.setattr(linear, "_onednn", lambda *a: calls.append(1) or real(*a))
    original = F.linear
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with linear.f_linear_on_onednn():
        torch.testing.assert_close(F.linear(x, w), original(x, w), atol=1e-5, rtol=1e-5)
        F.linear(x.double(), w.double())  # float64 keeps torch's own
    assert len(calls) == 1 and F.linear is original
