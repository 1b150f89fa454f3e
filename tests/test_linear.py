"""Float32 projections through oneDNN, chosen once at load for the engines' own forward (prism_ray/engine/linear.py)."""

from __future__ import annotations

import pytest
import reference
import torch
import torch.nn.functional as F
from conftest import english_texts

from prism_ray.engine import EvidenceEngine, ScoreEngine, linear, load_model

CPU = torch.device("cpu")


@pytest.fixture
def forced(monkeypatch):
    def force(value):
        monkeypatch.setenv("PRISM_RAY_LINEAR", value)
        linear.choose.cache_clear()
    yield force
    linear.choose.cache_clear()


def test_forced_onednn_is_float32_close_to_f_linear(forced):
    forced("onednn")
    name, fn = linear.linear_for((96, 64), torch.float32, CPU)
    assert name == "onednn" and fn is not F.linear
    x, w, b = torch.randn(5, 64), torch.randn(96, 64), torch.randn(96)
    out = fn(x, w, b)
    torch.testing.assert_close(out, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert not torch.equal(out, torch.zeros_like(out))


def test_bf16_other_devices_and_forced_torch_keep_f_linear(forced):
    forced("onednn")
    assert linear.linear_for((96, 64), torch.bfloat16, CPU) == ("torch", F.linear)
    assert linear.linear_for((96, 64), torch.float32, torch.device("cuda")) == ("torch", F.linear)
    forced("torch")
    assert linear.linear_for((96, 64), torch.float32, CPU) == ("torch", F.linear)


def test_a_bad_setting_is_named(forced):
    forced("mkl")
    with pytest.raises(ValueError, match="PRISM_RAY_LINEAR must be auto, onednn or torch, not 'mkl'"):
        linear.linear_for((96, 64), torch.float32, CPU)


def test_a_reference_model_on_the_same_weights_keeps_f_linear(forced, tiny_ckpt, monkeypatch):
    """Loading an engine on oneDNN changes nothing outside the engines: transformers' modules still call F.linear."""
    forced("onednn")
    loaded = load_model(tiny_ckpt, dtype="float32")
    assert loaded.kernels["linear"] == "onednn"
    calls = []
    monkeypatch.setattr(linear, "_onednn", lambda *a: calls.append(1))
    with torch.inference_mode():
        loaded.model(input_ids=torch.tensor([[1, 2, 3]]))
    assert not calls and all(type(m) is torch.nn.Linear for m in loaded.model.modules() if isinstance(m, torch.nn.Linear))


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
    assert loaded.kernels["linear"] == "onednn"
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
