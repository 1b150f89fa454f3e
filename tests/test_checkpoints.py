"""Offline test checkpoints: load with Auto* classes, real vocab, input-dependent outputs."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import english_texts
from transformers import AutoConfig, GenerationConfig

from prism_ray import checkpoints
from prism_ray.checkpoints import PRESETS, RELEASED, build_checkpoint, find_released
from prism_ray.engine import ScoreEngine


def test_registry_matches_model_card():
    assert [c.hub_id for c in RELEASED] == [
        "infgrad/Prism-Qwen3.5-Reranker-0.8B", "infgrad/Prism-Qwen3.5-Reranker-2B",
        "infgrad/Prism-Qwen3.5-Reranker-4B", "infgrad/Prism-Qwen3.5-Reranker-9B",
        "infgrad/Prism-Qwen3-Reranker-4B-exp",
    ]
    assert find_released("0.8b").parameters == "0.8B"
    assert find_released("9B").backbone == "Qwen3.5"
    assert find_released("4b-exp").backbone == "Qwen3-Reranker-4B"
    assert find_released("4b").name == "Prism-Qwen3.5-Reranker-4B"
    assert find_released("infgrad/Prism-Qwen3.5-Reranker-2B").size == "2b"
    assert find_released("13b") is None


def test_real_0_8b_shape():
    c = PRESETS["0.8b"]
    assert (c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]) == (1024, 24, 3584)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (8, 2, 256)
    assert (c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_key_head_dim"]) == (16, 16, 128)
    assert c["tie_word_embeddings"] and c["vocab_size"] == 248320
    assert [i for i, t in enumerate(c["layer_types"]) if t == "full_attention"] == list(range(3, 24, 4))
    assert PRESETS["bench"]["hidden_size"] == 1024 and PRESETS["bench"]["num_hidden_layers"] < 24


def test_build_loads_offline_with_stop_tokens(any_ckpt):
    config = AutoConfig.from_pretrained(any_ckpt)
    gen = GenerationConfig.from_pretrained(any_ckpt)
    assert set(gen.eos_token_id) == set(config.eos_token_id)
    assert len(gen.eos_token_id) == 2  # <|im_end|> and <|endoftext|>
    assert json.loads((any_ckpt / "1_LogitScore" / "config.json").read_text())["true_token_id"] in (9405, 9693)


def test_scores_spread_over_varied_documents(tiny_ckpt):
    scores = [r.score for r in ScoreEngine(tiny_ckpt).score_pairs(
        "What is the boiling point of water at sea level?", english_texts(20, 10, 150))]
    assert max(scores) - min(scores) >= 0.3


@pytest.mark.slow  # builds a checkpoint twice
def test_build_is_reproducible(tiny_ckpt, tmp_path):
    again = build_checkpoint("tiny", tmp_path / "again")
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(again) == digest(tiny_ckpt)
    other = build_checkpoint("tiny", tmp_path / "other", seed=1)
    assert digest(other) != digest(tiny_ckpt)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        checkpoints.build_checkpoint("huge", "/tmp/never")


def test_preset_checkpoint_builds_once_then_reuses(tmp_path, monkeypatch):
    from prism_ray import checkpoints

    built = []
    real = checkpoints.build_checkpoint
    monkeypatch.setattr(checkpoints, "build_checkpoint", lambda preset, out: built.append(out) or real(preset, out))
    first = checkpoints.preset_checkpoint("tiny", tmp_path / "tiny")
    again = checkpoints.preset_checkpoint("tiny", tmp_path / "tiny")
    assert first == again == tmp_path / "tiny" and (first / "config.json").is_file()
    assert built == [tmp_path / "tiny"]
