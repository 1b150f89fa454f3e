"""The front door for Python: `Reranker(model).rank(query, documents)`, as sentence-transformers'
`CrossEncoder(name).rank(...)`, with Prism's evidence and long-document chunking on request.

    >>> from prism_ray import Reranker
    >>> reranker = Reranker("checkpoints/tiny", dtype="float32")    # a local dir or a hub id
    >>> best = reranker.rank("What is water?", ["Water is H2O.", "Paris is in France."], top_n=1)
    >>> best[0].index, round(best[0].score, 3)                       # doctest: +SKIP
    (0, 0.93)
    >>> reranker.predict([("What is water?", "Water is H2O.")])      # doctest: +SKIP
    [0.93]
    >>> [d.evidence for d in reranker.rank("What is water?", ["Water is H2O."], evidence=1)]  # doctest: +SKIP
    ['Water is H2O.']

It runs the very engines the Serve tiers and Ray Data actors run (ScoreEngine, EvidenceEngine over
one loaded model) in this process; ranking, chunk folding and evidence targets are the functions
the service uses (`prism_ray.ranking`, `prism_ray.chunking.fold`). Results are the service's own
`RankedDocument`s, best first. From async code, `await reranker.arank(...)` (or `apredict`).

A Reranker loads and runs its model on one thread of its own: `rank` and `predict` wait for it, `arank` and
`apredict` await it, and calls are serialised, since one engine computes one call at a time. One thread
also keeps the process at one OpenMP team: with torch work on two threads (loaded on one, awaited on
another), libgomp makes its threads sleep between parallel regions once its teams outnumber the CPUs, which
cost 8-9 % on 2 CPUs (`benchmarks/bench_compute_thread.py`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prism_ray.api import ChunkingOptions, EvidenceOptions, RankedDocument
from prism_ray.chunking import chunk_documents, chunk_texts, fold
from prism_ray.prompt import DEFAULT_MAX_LENGTH
from prism_ray.ranking import best_first, wants_evidence

DEFAULT_EVIDENCE_TOKENS = 256


class Reranker:
    """A Prism checkpoint loaded once, for scoring, ranking and evidence in this process.

    `model`: a local checkpoint directory or a hub id. `dtype` "auto" is bf16 where the hardware computes
    it, else float32 (the dtype parity is defined in). `max_length`: prompt tokens per document, the
    prompt included (the card's 10,240 by default); longer documents are cut and say `truncated`.
    """

    def __init__(self, model: str | Path, dtype: str = "auto", device: str | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH):
        from prism_ray.engine import ScoreEngine

        self.name = str(model)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prism-reranker")
        self.scorer = self._thread.submit(ScoreEngine, model, dtype, device, max_length).result()
        self.loaded = self.scorer.loaded

    @functools.cached_property
    def generator(self):
        """The evidence engine, over the same weights; built on the first call that asks for evidence (on the
        Reranker's thread, as every call)."""
        from prism_ray.engine import EvidenceEngine

        return EvidenceEngine(self.loaded)

    def predict(self, pairs: Sequence[tuple[str, str]], raw: bool = False) -> list[float]:
        """A score per (query, document) pair, in order (`CrossEncoder.predict`): the calibrated relevance
        probability, or the logit `l_yes - l_no` with `raw=True`. Pairs of one query share its prefix state.

        >>> Reranker("checkpoints/tiny").predict([("q", "a"), ("q", "b"), ("r", "c")])  # doctest: +SKIP
        [0.48, 0.51, 0.47]
        """
        return self._thread.submit(self._predict, pairs, raw).result()

    def _predict(self, pairs: Sequence[tuple[str, str]], raw: bool) -> list[float]:
        groups: dict[str, list[int]] = {}
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"pairs[{i}] must be a (query, document) pair")
            groups.setdefault(pair[0], []).append(i)
        if not groups:
            return []
        results = self.scorer.score([(q, [pairs[i][1] for i in idxs]) for q, idxs in groups.items()])
        out: list[float] = [0.0] * len(pairs)
        for idxs, group in zip(groups.values(), results):
            for i, r in zip(idxs, group):
                out[i] = r.logit if raw else r.score
        return out

    def rank(self, query: str, documents: Sequence[str], top_n: int | None = None,
             evidence: int | dict | EvidenceOptions | None = None,
             chunking: dict | ChunkingOptions | None = None) -> list[RankedDocument]:
        """Every document (or the `top_n` best), best first; each with its `index` in `documents`, `score`,
        `logit`, `num_tokens` and `truncated`.

        `evidence`: the number of top documents to write contribution/evidence for, or the API's evidence
        options (`{"top_n": 3, "min_score": 0.5, "max_new_tokens": 256}`); those documents get
        `contribution`, `evidence`, `evidence_truncated` and `generated_text`. `chunking`
        (`{"max_chunks_per_doc": 8, "chunk_tokens": 512}`): a long document is scored by its best chunk,
        whose span is `chunk` (`documents[i][chunk["start"]:chunk["end"]]`), and evidence reads that chunk.
        """
        return self._thread.submit(self._rank, query, documents, top_n, evidence, chunking).result()

    async def arank(self, query: str, documents: Sequence[str], top_n: int | None = None,
                    evidence: int | dict | EvidenceOptions | None = None,
                    chunking: dict | ChunkingOptions | None = None) -> list[RankedDocument]:
        """`rank`, awaited: it runs on the Reranker's thread (an event loop must not wait on a forward pass)."""
        return await asyncio.wrap_future(self._thread.submit(self._rank, query, documents, top_n, evidence, chunking))

    async def apredict(self, pairs: Sequence[tuple[str, str]], raw: bool = False) -> list[float]:
        """`predict`, awaited (on the Reranker's thread)."""
        return await asyncio.wrap_future(self._thread.submit(self._predict, pairs, raw))

    def _rank(self, query: str, documents: Sequence[str], top_n: int | None, evidence, chunking) -> list[RankedDocument]:
        ev = _evidence_options(evidence)
        opts = ChunkingOptions.model_validate(chunking) if isinstance(chunking, dict) else chunking
        if top_n is not None and (not isinstance(top_n, int) or top_n < 1):
            raise ValueError(f"top_n must be a positive integer, not {top_n!r}")
        ranked = self._score(query, list(documents), opts)
        ranked = [ranked[i] for i in best_first([r.score for r in ranked])]
        if ev is not None:
            self._add_evidence(query, documents, ranked, ev)
        return ranked[:top_n] if top_n else ranked

    def _score(self, query: str, documents: list[str], opts: ChunkingOptions | None) -> list[RankedDocument]:
        if opts is None:
            results = self.scorer.score([(query, documents)])[0]
            return [RankedDocument(i, r.score, r.logit, r.num_tokens, r.truncated, self.name)
                    for i, r in enumerate(results)]
        chunked = chunk_documents(self.loaded.prompts, query, documents, opts.max_chunks_per_doc, opts.chunk_tokens,
                                  opts.overlap_tokens)
        folded = fold(chunked, self.scorer.score([(query, chunk_texts(documents, chunked))])[0])
        return [RankedDocument(i, f.best.score, f.best.logit, f.num_tokens, f.truncated, self.name, chunk=f.chunk)
                for i, f in enumerate(folded)]

    def _add_evidence(self, query: str, documents: Sequence[str], ranked: list[RankedDocument],
                      ev: EvidenceOptions) -> None:
        targets = [r for rank, r in enumerate(ranked, 1) if wants_evidence(rank, r.score, ev.top_n, ev.min_score)]
        answers = self.generator.generate([(query, r.scored_text(documents)) for r in targets],
                                          ev.max_new_tokens or DEFAULT_EVIDENCE_TOKENS)
        for r, a in zip(targets, answers):
            r.contribution, r.evidence, r.evidence_truncated, r.generated_text = (
                a.contribution, a.evidence, a.truncated, a.text)
            r.has_evidence = True


def _evidence_options(evidence) -> EvidenceOptions | None:
    if evidence is None or evidence is False:
        return None
    if isinstance(evidence, EvidenceOptions):
        return evidence
    if isinstance(evidence, bool):
        raise ValueError("evidence must be a number of top documents or evidence options, not True")
    if isinstance(evidence, int):
        return EvidenceOptions(top_n=evidence)
    return EvidenceOptions.model_validate(evidence)
