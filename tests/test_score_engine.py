"""ScoreEngine parity with the card's path A and path B (CrossEncoder), float32 on CPU."""

from __future__ import annotations

import pytest
import reference
import torch
from conftest import CHINESE, MIXED, SPECIAL_STRINGS, english_texts

from prism_ray.engine import ModelLoadError, ScoreEngine, load_model
from prism_ray.engine.score import Partial
from prism_ray.results import ScoreResult

TOL = 1e-5


@pytest.fixture(scope="module")
def engines(tiny_ckpt, qwen3_ckpt):
    return {str(p): ScoreEngine(p, dtype="float32") for p in (tiny_ckpt, qwen3_ckpt)}


def _groups():
    docs_en = ["", "water", "Water boils at 100 C (212 F) at sea level."] + english_texts(6, 10, 160)
    return [
        ("What is the boiling point of water at sea level?", docs_en),
        ("水的沸点是多少？", CHINESE + MIXED),
        ("ray serve", SPECIAL_STRINGS + ["ok"]),
    ]


def test_scores_equal_path_a(engines, any_ckpt):
    engine = engines[str(any_ckpt)]
    groups = _groups()
    results = engine.score(groups)  # several queries in one call
    logits = []
    for (query, docs), res in zip(groups, results):
        assert len(res) == len(docs)
        for doc, r in zip(docs, res):
            ref = reference.path_a(str(any_ckpt), reference.prompt_ids(str(any_ckpt), query, doc))
            assert abs(r.score - ref["score"]) <= TOL, (query, doc)
            assert abs(r.logit - ref["logit"]) <= 1e-4, (query, doc)
            assert r.num_tokens == len(reference.prompt_ids(str(any_ckpt), query, doc))
            assert not r.truncated
            logits.append(r.logit)
    assert max(logits) - min(logits) > 0.5  # the checkpoint's outputs really depend on the input


def test_truncated_documents_equal_path_a_on_the_cut_prompt(tiny_ckpt):
    engine = ScoreEngine(load_model(tiny_ckpt, dtype="float32", max_length=320))
    docs = [" ".join(english_texts(3, 150, 150)), "short one", "两百字" * 200]
    res = engine.score_pairs("boiling point", docs)
    for doc, r in zip(docs, res):
        pair = engine.prompts.encode("boiling point", doc)
        assert r.truncated == pair.truncated and r.num_tokens == pair.num_tokens <= 320
        ref = reference.path_a(str(tiny_ckpt), pair.ids)
        assert abs(r.score - ref["score"]) <= TOL
    assert [r.truncated for r in res] == [True, False, True]


def test_token_budget_changes_batches_not_scores(engines, tiny_ckpt):
    docs = english_texts(12, 5, 150)
    big = engines[str(tiny_ckpt)].score_pairs("query", docs)
    small = ScoreEngine(engines[str(tiny_ckpt)].loaded, token_budget=200).score_pairs("query", docs)
    for a, b in zip(big, small):
        assert abs(a.score - b.score) <= TOL


def test_rows_longer_than_the_budget_run_in_pieces_within_it_and_score_as_path_a(engines, any_ckpt, monkeypatch):
    """With a budget of 150 tokens, documents of ~300-900 tokens run their heads in pieces, none of them
    (nor any forward) over the budget, packed beside a short document; the scores are path A's."""
    engine = ScoreEngine(engines[str(any_ckpt)].loaded, token_budget=150)
    docs = [" ".join(english_texts(1, n, n)) for n in (200, 600)] + ["short one", "两百字" * 120]
    sizes = []
    forward = engine.loaded.net.forward_rows

    def recording(ids, rows, *args, **kw):
        sizes.append(sum(rows.lengths))
        return forward(ids, rows, *args, **kw)

    monkeypatch.setattr(engine.loaded.net, "forward_rows", recording)
    query = "What is the boiling point of water at sea level?"
    res = engine.score_pairs(query, docs)
    assert max(sizes[1:]) <= 150 and len(sizes) >= 6  # sizes[0]: the query's prefix, bounded by max_query_chars
    for doc, r in zip(docs, res):
        ids = reference.prompt_ids(str(any_ckpt), query, doc)
        assert r.num_tokens == len(ids) and (len(ids) > 300) == (doc != "short one")
        assert abs(r.score - reference.path_a(str(any_ckpt), ids)["score"]) <= TOL, doc[:30]


def test_score_step_runs_one_piece_per_call_and_its_partials_go_on_to_path_a(engines, any_ckpt):
    """`score_step` gives a long row back as a Partial after each piece (the short row beside it is scored in
    the first call); handing the partial back call after call ends in path A's score."""
    engine = ScoreEngine(engines[str(any_ckpt)].loaded, token_budget=150)
    query = "What is the boiling point of water at sea level?"
    docs = [" ".join(english_texts(6, 100, 100)), "short one"]
    prefix = engine.prompts.prefix(query)
    [[entry, short]] = engine.score_step([(prefix, engine.prompts.encode_documents(query, docs, prefix=prefix))])
    assert isinstance(short, ScoreResult)
    remaining = []
    while isinstance(entry, Partial):
        remaining.append(entry.remaining)
        [[entry]] = engine.score_step([(prefix, [entry])])
    assert len(remaining) >= 4 and remaining == sorted(remaining, reverse=True) and remaining[-1] <= 150
    for doc, r in zip(docs, (entry, short)):
        ids = reference.prompt_ids(str(any_ckpt), query, doc)
        assert r.num_tokens == len(ids)
        assert abs(r.score - reference.path_a(str(any_ckpt), ids)["score"]) <= TOL


@pytest.mark.slow  # loads sentence-transformers
def test_scores_equal_cross_encoder(engines, any_ckpt):
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(any_ckpt), local_files_only=True, model_kwargs={"dtype": torch.float32})
    query = "What is the boiling point of water at sea level?"
    docs = english_texts(8, 5, 120) + CHINESE
    # batch_size=1 as the card advises for parity: CrossEncoder left-pads batches, which shifts the
    # Gated DeltaNet's 64-token chunk grid and moves its own scores ~1e-5 away from path A.
    ce_scores = ce.predict([(query, d) for d in docs], batch_size=1)
    ours = engines[str(any_ckpt)].score_pairs(query, docs)
    for d, s, r in zip(docs, ce_scores, ours):
        assert abs(float(s) - r.score) <= TOL, d


@pytest.mark.parametrize("groups,match", [
    ([("", ["doc"])], "query must be a non-empty string"),
    ([("   ", ["doc"])], "query must be a non-empty string"),
    ([("q", [])], "at least one document"),
    ([("q", ["ok", 3])], r"documents\[1\] must be a string"),
    ([("q", "not a list")], "documents must be a list"),
    ([("q", ["ok", None])], r"documents\[1\] must be a string, not NoneType"),
])
def test_bad_input_is_a_clear_error(engines, tiny_ckpt, groups, match):
    with pytest.raises(ValueError, match=match):
        engines[str(tiny_ckpt)].score(groups)


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        ScoreEngine(tmp_path / "missing")


def _many_queries() -> list[tuple[str, list[str]]]:
    """Queries whose prefixes differ in length (so their cached states differ: 128/192/256 tokens on the
    hybrid backbone) and two that differ by one word (same cached length: their prefixes run as one batch),
    each with 1-5 documents of varied length."""
    words = " ".join(english_texts(8, 60, 60)).split()
    queries = [" ".join(words[k * 5: k * 5 + n]) for k, n in enumerate((2, 11, 25, 40, 58))]
    queries.append(queries[1] + " please")
    docs = english_texts(20, 3, 140)
    return [(q, docs[k * 3: k * 3 + 1 + k % 5]) for k, q in enumerate(queries)]


@pytest.mark.slow  # path A for every pair, both backbones
def test_packed_queries_equal_path_a_and_one_query_at_a_time(engines, any_ckpt):
    """Rows of different queries share forward passes (a small budget forces many mixed batches); every
    score equals the card's path A and scoring the query alone."""
    engine = engines[str(any_ckpt)]
    packed = ScoreEngine(engine.loaded, token_budget=300)
    groups = _many_queries()
    together = packed.score(groups)
    alone = [engine.score([g])[0] for g in groups]
    for (query, docs), res, ref_alone in zip(groups, together, alone):
        assert len(res) == len(docs)
        for doc, r, a in zip(docs, res, ref_alone):
            assert abs(r.score - a.score) <= TOL and r.num_tokens == a.num_tokens
            ref = reference.path_a(str(any_ckpt), reference.prompt_ids(str(any_ckpt), query, doc))
            assert abs(r.score - ref["score"]) <= TOL, (query, doc)


def test_queries_with_few_documents_run_their_prefix_in_the_rows_with_the_same_scores(engines, any_ckpt, monkeypatch):
    """Below `prefix_min_docs`, a query's prefix is not a forward of its own: its rows continue from the shared
    head and run the query's tokens themselves. One forward fewer, the same scores (path A's)."""
    engine = engines[str(any_ckpt)]
    inline = ScoreEngine(engine.loaded, prefix_min_docs=4)
    groups = [("what keeps a query short?", english_texts(3, 20, 60)), ("a query with more documents", english_texts(5, 20, 60))]
    head = engine.loaded.prefixes.head()[1]  # once per process, before counting
    forwards = []
    real = engine.loaded.net.forward_rows
    monkeypatch.setattr(engine.loaded.net, "forward_rows", lambda ids, rows, **kw: forwards.append(rows.contexts) or real(ids, rows, **kw))
    got = inline.score(groups)
    assert len(forwards) == 2  # the second query's prefix, then every row
    assert sum(c is head for c in forwards[1]) == 3  # the first query's rows, from the shared head
    want = engine.score(groups)
    for (query, docs), res, ref in zip(groups, got, want):
        for doc, r, w in zip(docs, res, ref):
            assert abs(r.score - w.score) <= TOL and r.num_tokens == w.num_tokens
            assert abs(r.score - reference.path_a(str(any_ckpt), reference.prompt_ids(str(any_ckpt), query, doc))["score"]) <= TOL


def test_a_query_prefix_is_kept_for_the_next_calls_and_the_oldest_is_let_go(engines, any_ckpt, monkeypatch):
    """The scorer tier scores one request in several engine calls: the first runs the query's prefix, the
    next ones continue from its kept state (no prefix forward) with path A's scores; past `keep` other
    queries, the oldest prefix runs again."""
    engine = engines[str(any_ckpt)]
    cache = engine.loaded.prefixes
    query, docs = "a query asked over several calls", english_texts(4, 20, 60)
    cache.head()  # once per process, before counting
    forwards = []
    real = engine.loaded.net.forward_rows
    monkeypatch.setattr(engine.loaded.net, "forward_rows", lambda ids, rows, **kw: forwards.append(kw.get("keep_states", False)) or real(ids, rows, **kw))
    engine.score([(query, docs[:2])])
    assert forwards == [True, False]  # the prefix (its state kept), then the rows
    forwards.clear()
    results = engine.score([(query, docs[2:])])[0]
    assert forwards == [False]  # the rows only, from the kept prefix state
    for doc, r in zip(docs[2:], results):
        assert abs(r.score - reference.path_a(str(any_ckpt), reference.prompt_ids(str(any_ckpt), query, doc))["score"]) <= TOL
    for k in range(cache.keep):  # as many other queries push it out
        engine.score([(f"another query, number {k}", docs[:1])])
    assert len(cache._recent) == cache.keep
    forwards.clear()
    engine.score([(query, docs[:1])])
    assert forwards == [True, False]


def test_packing_really_mixes_queries_in_one_forward(engines, tiny_ckpt, monkeypatch):
    engine = ScoreEngine(engines[str(tiny_ckpt)].loaded, token_budget=100_000)
    seen = []
    original = engine._forward_rows
    monkeypatch.setattr(engine, "_forward_rows", lambda states, rows: seen.append(len({r[2] for r in rows}))
                        or original(states, rows))
    groups = _many_queries()
    engine.score(groups)
    assert seen == [len(groups)]  # one forward, every query in it


def test_warm_up_is_a_real_call_that_leaves_scores_alone(engines, tiny_ckpt, monkeypatch):
    engine = engines[str(tiny_ckpt)]
    before = engine.score_pairs("boiling point", ["water boils at 100 C"])
    calls = []
    real = engine.score_encoded_groups
    monkeypatch.setattr(engine, "score_encoded_groups", lambda groups: calls.append(groups) or real(groups))
    assert engine.warm_up() > 0
    assert [sum(len(pairs) for _, pairs in call) for call in calls] == [1, 3]  # two shapes: compiled chains turn dynamic
    assert engine.score_pairs("boiling point", ["water boils at 100 C"]) == before
