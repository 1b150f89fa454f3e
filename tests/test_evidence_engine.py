"""EvidenceEngine parity with the card's path A greedy generation."""

from __future__ import annotations

import pytest
import reference
import torch
from conftest import CHINESE, english_texts

from prism_ray.engine import EvidenceEngine
from prism_ray.engine.scope import engine_kernels

QUERY = "What is the boiling point of water at sea level?"


@pytest.fixture(scope="module")
def evidence_engines(tiny_ckpt, qwen3_ckpt):
    return {str(p): EvidenceEngine(p, dtype="float32") for p in (tiny_ckpt, qwen3_ckpt)}


@pytest.mark.slow  # path A greedy generation, four ways
@pytest.mark.parametrize("max_batch_size", [1, 4])
def test_text_equals_path_a_greedy(evidence_engines, any_ckpt, max_batch_size):
    engine = evidence_engines[str(any_ckpt)]
    engine.max_batch_size = max_batch_size
    engine.token_budget = 1 if max_batch_size == 1 else 100_000  # batches of 4: one right-padded prefill each
    pairs = [(QUERY, d) for d in english_texts(5, 5, 140)] + [("沸点", CHINESE[0]), (QUERY, "")]
    results = engine.generate(pairs, max_new_tokens=20)
    texts = set()
    for (q, d), r in zip(pairs, results):
        ref = reference.path_a(str(any_ckpt), reference.prompt_ids(str(any_ckpt), q, d), max_new_tokens=20)
        assert r.text == ref["text"], (q, d)
        assert abs(r.score - ref["score"]) <= 1e-5
        assert r.truncated == (r.generated_tokens == 20)  # random weights rarely emit end of turn
        texts.add(r.text)
    assert len(texts) > 1  # greedy texts differ between documents


def test_result_fields_and_stop_at_end_of_turn(evidence_engines, tiny_ckpt):
    engine = evidence_engines[str(tiny_ckpt)]
    # Force an immediate end of turn: the stop set decides when a row finishes.
    first = engine.generate([(QUERY, "water")], max_new_tokens=1)[0]
    first_token = engine.prompts.encode_text(first.text)[0]
    saved = engine._stop
    try:
        engine._stop = saved | {first_token}
        r = engine.generate([(QUERY, "water")], max_new_tokens=10)[0]
    finally:
        engine._stop = saved
    assert r.generated_tokens == 1 and not r.truncated
    assert first.truncated and first.generated_tokens == 1
    assert r.relevant == (r.text.startswith("yes"))


def test_bad_arguments(evidence_engines, tiny_ckpt):
    engine = evidence_engines[str(tiny_ckpt)]
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([(QUERY, "d")], max_new_tokens=0)
    with pytest.raises(ValueError, match="query must be a non-empty string"):
        engine.generate([("", "d")])
    with pytest.raises(ValueError, match=r"documents\[0\] must be a string"):
        engine.generate([(QUERY, 7)])


def test_sampling_with_seed_is_reproducible(evidence_engines, tiny_ckpt):
    engine = evidence_engines[str(tiny_ckpt)]
    a = engine.generate([(QUERY, "water")], max_new_tokens=8, temperature=0.5, seed=3)
    b = engine.generate([(QUERY, "water")], max_new_tokens=8, temperature=0.5, seed=3)
    assert a[0].text == b[0].text


def _real_slots(cache, mask, row):
    """Row `row`'s attention K/V at its real slots, and its linear-attention states, per layer."""
    out = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.numel():
            real = mask[row].bool().to(keys.device)
            out.append((keys[row][:, real], layer.values[row][:, real]))
        for name in ("conv_states", "recurrent_states"):
            out.extend(t[row] for t in (getattr(layer, name, None) or {}).values() if isinstance(t, torch.Tensor))
    return out


def test_right_padded_prefill_leaves_each_row_as_one_pair_at_a_time(evidence_engines, any_ckpt):
    """Pairs of two queries and lengths 1 to ~200 tokens in one padded forward: every row's first-token logit,
    attention K/V (at its real slots) and Gated DeltaNet conv and recurrent states equal those of a prefill
    of that pair alone, to float32 rounding (which depends on the batch shape, so 1e-4). Letting the pads
    reach the conv state, or the recurrent state, moves some state by 3.3, or 0.96, on the tiny checkpoint."""
    engine = evidence_engines[str(any_ckpt)]
    pairs = [(QUERY, d) for d in ["", "water"] + english_texts(3, 20, 160)] + [("沸点", CHINESE[0])]
    together = EvidenceEngine(engine.loaded, token_budget=100_000)
    alone = EvidenceEngine(engine.loaded, token_budget=1)  # every pair its own batch: no pads
    gen = torch.Generator()
    with torch.inference_mode(), engine_kernels():
        rows_t, cache_t, mask_t = together._prefill(pairs, 0.0, gen)
        rows_a, cache_a, mask_a = alone._prefill(pairs, 0.0, gen)
    assert len({len(r.pair.ids) for r in rows_t}) >= 4  # lengths differ: pads in the batch
    assert (mask_t == 0).any(dim=1).sum() >= len(pairs) - 1
    # Rows come in the cache's order; `index` says which pair each is.
    assert sorted(r.index for r in rows_t) == sorted(r.index for r in rows_a) == list(range(len(pairs)))
    at_a = {r.index: k for k, r in enumerate(rows_a)}
    for i, rt in enumerate(rows_t):
        j = at_a[rt.index]
        ra = rows_a[j]
        assert rt.pair.ids == ra.pair.ids == engine.prompts.encode(*pairs[rt.index]).ids
        assert abs(rt.logit - ra.logit) <= 1e-4 and rt.tokens == ra.tokens  # score tests allow 1e-4 in logits too
        for a, b in zip(_real_slots(cache_t, mask_t, i), _real_slots(cache_a, mask_a, j)):
            if isinstance(a, tuple):
                for x, y in zip(a, b):
                    torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
            else:
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
