"""Scorer tier: one forward pass per document, gathered across concurrent requests.

Requests are split into items of at most `max_batch_tokens` tokens of engine work (a pair's prompt less the
shared head its row reads from a cached state: `ScoreEngine.row_tokens`); a `FairBatcher` gathers items of
concurrent requests into one engine call of at most `max_batch_tokens` (one pair always fits),
the least served request's first, so a request of many long documents does not hold a small one behind
all of its items. A pair longer than the engine's token budget is an item of its own that runs a
piece per engine call (`ScoreEngine.score_step`), so a small request waits out one piece of it, not its
whole prefill; at most `max_batch_tokens // engine budget` such pairs (at least one) are under way at
once, which bounds the states a replica holds between pieces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ray import serve

from deployments.fair_batch import Again, FairBatcher
from deployments.threads import ComputeThread
from prism_ray import metrics
from prism_ray.config import ModelConfig, ScorerTierConfig
from prism_ray.engine.score import Partial
from prism_ray.factory import build_engine
from prism_ray.prompt import EncodedPair
from prism_ray.results import ScoreReply, ScoreResult, Timing


@dataclass(frozen=True, eq=False)
class EngineCall:
    """One gathered engine call and how long it took; each call is its own object (compared by identity),
    so the items it computed all hold the same one."""

    ms: float


def engine_ms(calls: list[EngineCall]) -> float:
    """A request's engine time: each call that computed any of its items, once. Its items go to calls one
    after another (one replica, one compute thread), and several of them may share a call."""
    return sum(c.ms for c in set(calls))


@dataclass
class _Item:
    """Some documents of one request, already tokenized (sizing the batch needs the token counts, and
    the engine then reuses the encoding), or one long pair part-way through (a `Partial`), with the
    engine calls that have computed it so far."""

    prefix: list[int]
    pairs: list[EncodedPair | Partial]
    enqueued: float = field(default_factory=time.monotonic)
    calls: tuple[EngineCall, ...] = ()


@serve.deployment
class Scorer:
    def __init__(self, model: dict):
        self.config = ModelConfig.model_validate(model)
        tier: ScorerTierConfig = self.config.scorer
        self._compute = ComputeThread(tier.torch_threads, tier.wedged_after_s)
        self.engine = self._compute.call(build_engine, self.config, "scorer")  # its OpenMP team: threads.py
        self._batcher = FairBatcher(self._batched, tier.max_batch_tokens, tier.batch_wait_timeout_s,
                                    self._next_tokens, may_continue=self._starts_pieces,
                                    max_continuing=max(1, tier.max_batch_tokens // self.engine.token_budget),
                                    max_passed_over=tier.max_passed_over)

    async def score(self, query: str, documents: list[str], max_doc_tokens: int | None = None) -> ScoreReply:
        """The engine's ScoreResult per document, in the documents' order, and the call's timing: tokenizing
        this request plus the engine call(s) that scored it, i.e. what ScoreEngine.score does in-process (the
        router reports it as Server-Timing)."""
        return (await self.score_groups([(query, documents, max_doc_tokens)]))[0]

    async def score_groups(self, groups: list[tuple[str, list[str], int | None]]) -> list[ScoreReply]:
        """`score` for several (query, documents, max_doc_tokens) groups at once: their items are queued
        together, so they reach the same gathered engine call (the score API's several queries)."""
        started = time.perf_counter()
        prompts = self.engine.prompts
        items, counts = [], []
        for query, documents, max_doc_tokens in groups:
            prefix = prompts.prefix(query)
            pairs = prompts.encode_documents(query, documents, prefix=prefix, max_doc_tokens=max_doc_tokens)
            mine = self._split(prefix, pairs)
            items.extend(mine)
            counts.append(len(mine))
        tokenize_ms = 1000 * (time.perf_counter() - started)
        parts = await self._batcher.submit(items)  # per item: (its results, the engine calls that computed it)
        out, at = [], 0
        for n in counts:
            mine, at = parts[at:at + n], at + n
            out.append(ScoreReply([r for results, _ in mine for r in results],
                                  Timing(tokenize_ms + engine_ms([call for _, calls in mine for call in calls]))))
        return out

    def _split(self, prefix: list[int], pairs: list[EncodedPair]) -> list[_Item]:
        """Items of at most max_batch_tokens tokens of engine work; a pair longer than the engine's budget is
        an item of its own (it runs in pieces)."""
        most = self.config.scorer.max_batch_tokens
        items, mine, acc = [], [], 0
        for pair in pairs:
            tokens, in_pieces = self.engine.row_tokens(prefix, pair), self._in_pieces(prefix, pair)
            if mine and (acc + tokens > most or in_pieces):
                items.append(_Item(prefix, mine))
                mine, acc = [], 0
            mine.append(pair)
            acc += tokens
            if in_pieces:
                items.append(_Item(prefix, mine))
                mine, acc = [], 0
        if mine:
            items.append(_Item(prefix, mine))
        return items

    def _in_pieces(self, prefix: list[int], pair: EncodedPair) -> bool:
        """Whether a pair is longer than one forward of the engine, so it runs a piece per engine call."""
        return self.engine.row_tokens(prefix, pair) > self.engine.token_budget

    def _starts_pieces(self, item: _Item) -> bool:
        """Whether computing the item may leave a pair part-way (the batcher bounds how many are)."""
        return any(not isinstance(p, Partial) and self._in_pieces(item.prefix, p) for p in item.pairs)

    def _next_tokens(self, item: _Item) -> int:
        """Tokens the item's next engine call computes: a long pair's next piece, at most the budget."""
        return sum(min(self.engine.row_tokens(item.prefix, p), self.engine.token_budget) for p in item.pairs)

    def check_health(self) -> None:
        """Serve's periodic health check: fails when the engine is wedged (see deployments.threads)."""
        self._compute.check()

    async def _batched(self, items: list[_Item]) -> list[tuple[list[ScoreResult], tuple[EngineCall, ...]] | Again]:
        now = time.monotonic()
        name = self.config.name
        for item in items:
            if not item.calls:  # its first call (a long pair's later pieces waited behind their own)
                metrics.observe("prism_queue_wait_seconds", now - item.enqueued, metrics.SECONDS_BUCKETS, model=name, tier="scorer")
        metrics.observe("prism_batch_pairs", sum(len(i.pairs) for i in items), metrics.SIZE_BUCKETS, model=name, tier="scorer")
        started = time.perf_counter()
        results = await self._compute.run(self._score_items, items)
        call = EngineCall(1000 * (time.perf_counter() - started))
        scored = [x for r in results for x in r if isinstance(x, ScoreResult)]
        metrics.count("prism_pairs_scored_total", len(scored), model=name)
        metrics.count("prism_tokens_total", sum(x.num_tokens for x in scored), model=name, tier="scorer")
        out = []
        for item, r in zip(items, results):
            calls = item.calls + (call,)
            if any(isinstance(x, Partial) for x in r):
                out.append(Again(_Item(item.prefix, r, item.enqueued, calls)))
            else:
                out.append((r, calls))
        return out

    def _score_items(self, items: list[_Item]) -> list[list[ScoreResult | Partial]]:
        """Every item of a gathered batch in one engine call: rows of all queries are packed into forward
        passes together, and the engine runs each distinct prefix once (items of one query share it); a
        long pair runs its next piece only."""
        return self.engine.score_step([(item.prefix, item.pairs) for item in items])
