"""EvidenceEngine parity with the card's path A greedy generation."""

from __future__ import annotations

import pytest
import reference
import torch
from conftest import CHINESE, english_texts

from prism_ray.engine import EvidenceEngine
from prism_ray.engine.evidence import DecodeLoop

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


def _layer_tensors(state):
    """A sequence state's tensors, layer by layer: attention K/V, or linear-attention conv and recurrent state."""
    out = []
    for layer in state.layers:
        out.extend((layer.k, layer.v) if hasattr(layer, "k") else (layer.conv, layer.recurrent))
    return out


def _prefilled(engine, pairs):
    """The pairs as sequences after prefill (each with its first token, logit and state), all in one round."""
    seqs = [engine.sequence(q, d, index=i) for i, (q, d) in enumerate(pairs)]
    DecodeLoop(engine, 1, 1)._contexts(seqs)  # their queries' prefix states, as an admission round sets them
    with torch.inference_mode():
        engine._prefill(seqs)
    return seqs


def test_packed_prefill_leaves_each_row_as_one_pair_at_a_time(evidence_engines, any_ckpt):
    """Pairs of two queries and lengths 1 to ~200 tokens packed into one forward: every row's first-token logit,
    attention K/V and Gated DeltaNet conv and recurrent states equal those of a prefill of that pair alone, to
    float32 rounding (which depends on the batch shape, so 1e-4)."""
    engine = evidence_engines[str(any_ckpt)]
    pairs = [(QUERY, d) for d in ["", "water"] + english_texts(3, 20, 160)] + [("沸点", CHINESE[0])]
    together = EvidenceEngine(engine.loaded, token_budget=100_000)
    alone = EvidenceEngine(engine.loaded, token_budget=1)  # every pair its own forward
    rows_t, rows_a = _prefilled(together, pairs), _prefilled(alone, pairs)
    assert len({r.pair.num_tokens for r in rows_t}) >= 4  # lengths differ
    for rt, ra, pair in zip(rows_t, rows_a, pairs):
        assert rt.pair.ids == ra.pair.ids == engine.prompts.encode(*pair).ids
        assert rt.state.length == ra.state.length == rt.pair.num_tokens
        assert abs(rt.logit - ra.logit) <= 1e-4 and rt.tokens == ra.tokens  # score tests allow 1e-4 in logits too
        for x, y in zip(_layer_tensors(rt.state), _layer_tensors(ra.state), strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # path A greedy generation for every pair
def test_pairs_joining_and_leaving_mid_decode_keep_path_a_text(evidence_engines, any_ckpt):
    """Two slots, five pairs: pair 0 is cancelled at the first host sync, so pair 2 joins the running decode
    beside pair 1, and so on. Every pair that ran to its end writes path A's greedy text; the cancelled one a
    prefix of it."""
    engine = EvidenceEngine(evidence_engines[str(any_ckpt)].loaded, max_batch_size=2)
    engine.sync_every = 4
    pairs = [(QUERY, d) for d in english_texts(4, 5, 120)] + [("沸点", CHINESE[1])]
    admitted = []
    original = engine._prefill
    engine._prefill = lambda rows, *a: admitted.append([r.index for r in rows]) or original(rows, *a)
    results = engine.generate(pairs, max_new_tokens=14, should_stop=lambda i: i == 0)
    assert admitted[0] == [0, 1] and admitted[1] == [2]  # pair 2 took pair 0's slot while pair 1 decoded
    for i, ((q, d), r) in enumerate(zip(pairs, results)):
        ref = reference.path_a(str(any_ckpt), reference.prompt_ids(str(any_ckpt), q, d), max_new_tokens=14)
        if i == 0:
            assert r.generated_tokens == 5 and ref["text"].startswith(r.text)
        else:
            assert r.text == ref["text"], (q, d)
            assert abs(r.score - ref["score"]) <= 1e-5


def test_graphed_generate_reuses_its_decode_loop_and_writes_the_eager_text(evidence_engines, tiny_ckpt):
    """With CUDA graphs, `generate` keeps its decode loop (pool and captured graphs) for the next call. On a CPU
    the graphs' fixed-shape step runs eagerly (`GraphedDecode(capture=False)`), so forcing the setting on here
    runs the GPU's decode path (the pool's leading slots in place, free slots inside the bucket, slots freed
    and taken again mid-call) and the reuse: the texts are those of the plain engine."""
    plain = evidence_engines[str(tiny_ckpt)]
    graphed = EvidenceEngine(plain.loaded, max_batch_size=4)
    graphed.cuda_graphs = True  # refused at construction on a CPU; the fixed-shape step runs eagerly here
    pairs = [(QUERY, d) for d in english_texts(6, 5, 120)]
    loops = []
    # 3 pairs; 3 others (the kept 3-slot loop, grown for longer answers); 5 through 4 slots (a new loop)
    for batch, new in ((pairs[:3], 12), (pairs[3:], 20), (pairs[:5], 9)):
        got = [r.text for r in graphed.generate(batch, max_new_tokens=new)]
        assert got == [r.text for r in plain.generate(batch, max_new_tokens=new)]
        loops.append(graphed._idle_loop)
    assert loops[0] is loops[1] and loops[2] is not loops[1] and loops[2].pool.slots == 4
    assert plain._idle_loop is None  # without graphs nothing is kept between calls
