"""What a rerank request means, in plain async Python: ranking (scoring through the tiers, chunk folding,
the cascade), evidence targets, the score API's reply, and admission.

It is one of three modules a request passes through outside Ray and HTTP: `prism_ray.prepare` decides the
model and checks every limit (`prism_ray.limits`) before a tier is called; this module ranks and asks for
evidence; `prism_ray.stream` orders a streamed answer's events. The tiers come in as async callables
(`prism_ray.tiers`' Protocols), so nothing here knows Ray: the Serve router passes handle calls, tests pass
plain functions. Errors are `PrismError`s of a kind (`prism_ray.errors`); the HTTP layer maps kinds to statuses.

    service = RerankService(config, prompts, score=score_call, evidence=evidence_call)
    with service.admission():           # or: slot = service.admission(); ...; slot.release()
        prepared = service.prepare(job)              # sync: tokenizes; run it off the event loop
        body, ranked = await service.respond(job, prepared)  # or: async for event, data in service.events(...)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping

from prism_ray.api import RankedDocument, RerankJob, ScoreJob, render
from prism_ray.chunking import chunk_texts, fold
from prism_ray.config import AppConfig, ModelConfig
from prism_ray.errors import ErrorKind, PrismError
from prism_ray.limits import LIMITS
from prism_ray.prepare import Prepared, PreparedScore, Preparer
from prism_ray.prompt import CUT_MARGIN_TOKENS, FIRST_CHARS_PER_TOKEN, PrismPromptTokenizer
from prism_ray.ranking import best_first, wants_evidence
from prism_ray.stream import events
from prism_ray.tiers import EvidenceCall, EvidenceStreamCall, ScoreCall, ScoreGroupsCall


class RerankService:
    def __init__(self, config: AppConfig, prompts: Mapping[str, PrismPromptTokenizer],
                 score: ScoreCall, evidence: EvidenceCall, evidence_models: set[str] | None = None,
                 score_groups: ScoreGroupsCall | None = None, evidence_stream: EvidenceStreamCall | None = None):
        """`prompts`: each model's prompt tokenizer (limits count its tokens). `evidence_models`: models
        that have an evidence tier (default: those whose config has one). The tier callables are
        `prism_ray.tiers`' Protocols; `score_groups` (several queries in one engine call) and `evidence_stream`
        (evidence_delta events) are optional."""
        self.config = config
        self.limits = config.limits
        self.prompts = prompts
        self._score = score
        self._score_groups = score_groups
        self._evidence = evidence
        self._evidence_stream = evidence_stream
        self.evidence_models = (evidence_models if evidence_models is not None
                                else {m.name for m in config.models if m.evidence is not None})
        self.preparer = Preparer(config, prompts, self.evidence_models)
        self.in_flight = 0

    # -- admission ------------------------------------------------------------------------------------
    def admission(self) -> _Slot:
        """One of `max_in_flight` slots, held until released (or the end of a `with`); 429 when none is
        free. A streamed answer hands its slot to the stream, which releases it when the stream ends."""
        if self.in_flight >= self.limits.max_in_flight:
            raise LIMITS["max_in_flight"].refusal(self.limits.max_in_flight, retry_after_s=self.limits.retry_after_s)
        return _Slot(self)

    # -- what the job asks for (prism_ray.prepare) ----------------------------------------------------------
    def prepare(self, job: RerankJob) -> Prepared:
        """The model (and screen) the job asks for and its chunks, after every limit is checked; the job is
        not changed. Synchronous (it tokenizes): an async host runs it in an executor."""
        return self.preparer.rerank(job)

    def prepare_score(self, job: ScoreJob) -> PreparedScore:
        """`prepare` for the score API: the model and per pair its document room. Sync: run it off the loop."""
        return self.preparer.score(job)

    # -- scoring and cascade ----------------------------------------------------------------------------
    async def _score_some(self, model: ModelConfig, job: RerankJob, prepared: Prepared,
                          indices: list[int]) -> list[RankedDocument]:
        docs = [job.documents[i] for i in indices]
        chunked = None if prepared.chunked is None else [prepared.chunked[i] for i in indices]
        # With chunking, every chunk of every document in one call: they share the query's prefix state.
        texts = docs if chunked is None else chunk_texts(docs, chunked)
        texts = await self._heads(model.name, job.query, texts, job.max_tokens_per_doc)
        reply = await self._score(model.name, job.query, texts, job.max_tokens_per_doc)
        results = reply.results
        if len(results) != len(texts):
            raise PrismError(ErrorKind.INTERNAL, f"the {model.name} scorer returned {len(results)} results "
                                                 f"for {len(texts)} documents")
        folded = None if chunked is None else fold(chunked, results)
        ranked = []
        for n, i in enumerate(indices):
            if folded is None:
                best, chunk, truncated, tokens = results[n], None, results[n].truncated, results[n].num_tokens
            else:
                f = folded[n]
                best, chunk, truncated, tokens = f.best, f.chunk, f.truncated, f.num_tokens
            ranked.append(RankedDocument(i, best.score, best.logit, tokens, truncated, model.name,
                                         compute_ms=reply.timing.compute_ms, chunk=chunk))
        if not job.truncate:
            for r in ranked:
                if r.truncated:
                    param = f"{job.documents_field}.{r.index}"
                    why = (f"needs more than chunking.max_chunks_per_doc={job.chunking.max_chunks_per_doc} chunks"
                           if job.chunking else f"longer than the model's max_length of {model.max_length} tokens "
                                                "with the prompt")
                    raise PrismError(ErrorKind.TOO_LARGE, f"{param}: {why}, and truncate is false", param)
        return _best_first(ranked)

    async def rank(self, job: RerankJob, prepared: Prepared) -> list[RankedDocument]:
        """Every document, best first. With a cascade, the screen model scores all of them and the model
        re-scores the screen's top `rescore_top`, which then lead the list."""
        every = list(range(len(job.documents)))
        if prepared.screen is None:
            return await self._score_some(prepared.model, job, prepared, every)
        screened = await self._score_some(prepared.screen, job, prepared, every)
        top = screened[: job.cascade.rescore_top]
        rescored = await self._score_some(prepared.model, job, prepared, [r.index for r in top])
        return rescored + screened[len(top):]

    def _render(self, job: RerankJob, prepared: Prepared, ranked: list[RankedDocument]) -> dict | list:
        return render(job, ranked, str(uuid.uuid4()), prepared.model.name, cascade=prepared.screen is not None)

    # -- evidence ---------------------------------------------------------------------------------------
    def evidence_targets(self, job: RerankJob, ranked: list[RankedDocument]) -> list[RankedDocument]:
        ev = job.evidence
        if ev is None:
            return []
        return [r for rank, r in enumerate(ranked, 1) if wants_evidence(rank, r.score, ev.top_n, ev.min_score)]

    async def _evidence_args(self, job: RerankJob, model: ModelConfig, r: RankedDocument) -> tuple[str, str, str, int]:
        max_new = job.evidence.max_new_tokens or self.limits.max_new_tokens
        (text,) = await self._heads(model.name, job.query, [r.scored_text(job.documents)], None)
        return model.name, job.query, text, max_new

    async def _heads(self, model_name: str, query: str, texts: list[str], max_doc_tokens: int | None) -> list[str]:
        """Each text, or for one longer than the model reads, the cut of it that holds all it reads
        (`PrismPromptTokenizer.document_head`): a tier is sent, and tokenizes, no more than it uses, and
        answers exactly as for the whole text. Cuts are tokenized off the event loop."""
        prompts = self.prompts[model_name]
        bound = (prompts.max_length + CUT_MARGIN_TOKENS) * FIRST_CHARS_PER_TOKEN  # a text under it is never cut
        if all(len(t) <= bound for t in texts):
            return texts

        def cut() -> list[str]:
            need = prompts.document_room(prompts.prefix(query), max_doc_tokens) + 1
            return [prompts.document_head(t, need) if len(t) > bound else t for t in texts]

        return await asyncio.get_running_loop().run_in_executor(None, cut)

    async def _evidence_one(self, job: RerankJob, model: ModelConfig, r: RankedDocument) -> None:
        r.add_evidence(await self._evidence(*await self._evidence_args(job, model, r)))

    async def respond(self, job: RerankJob, prepared: Prepared,
                      ranked: list[RankedDocument] | None = None) -> tuple[dict | list, list[RankedDocument]]:
        """The whole answer at once: the response body in the client's shape, and the ranked documents
        (pass `ranked` when the ranking is already computed)."""
        if ranked is None:
            ranked = await self.rank(job, prepared)
        await asyncio.gather(*(self._evidence_one(job, prepared.model, r) for r in self.evidence_targets(job, ranked)))
        return self._render(job, prepared, ranked), ranked

    async def events(self, job: RerankJob, prepared: Prepared, ranked: list[RankedDocument] | None = None,
                     deadline: float | None = None) -> AsyncIterator[tuple[str, dict | list]]:
        """The stream (`prism_ray.stream`): `scores`, each target's `evidence_delta`s and its `evidence` or
        `error`, then `done`. Pass `ranked` to stream a ranking already computed (a host that must fail
        before it starts a stream does so); `deadline` is event-loop time."""
        if ranked is None:
            ranked = await self.rank(job, prepared)
        model = prepared.model

        async def pieces(r: RankedDocument):
            args = await self._evidence_args(job, model, r)
            if self._evidence_stream is None:
                yield await self._evidence(*args)
            else:
                async for piece in self._evidence_stream(*args):
                    yield piece

        async for item in events(self._render(job, prepared, ranked), self.evidence_targets(job, ranked), pieces,
                                 deadline, self.timeout_error):
            yield item

    def timeout_error(self, what: str = "the request") -> PrismError:
        return LIMITS["request_timeout_s"].refusal(self.limits.request_timeout_s, what)

    # -- the score API (vLLM's /score) ------------------------------------------------------------------
    async def score_pairs(self, job: ScoreJob, prepared: PreparedScore) -> dict:
        """vLLM's score response, in input order. Pairs are grouped by (query, document room), and every
        group goes to the scorer in one call, so several queries share the engine's forward passes."""
        model = prepared.model
        groups: dict[tuple[str, int | None], list[int]] = {}
        for i, ((query, _), room) in enumerate(zip(job.pairs, prepared.rooms)):
            groups.setdefault((query, room), []).append(i)
        calls = [(q, await self._heads(model.name, q, [job.pairs[i][1] for i in idxs], room), room)
                 for (q, room), idxs in groups.items()]
        if self._score_groups is not None:
            results = await self._score_groups(model.name, calls)
        else:
            results = await asyncio.gather(*(self._score(model.name, q, docs, room) for q, docs, room in calls))
        data: list[dict | None] = [None] * len(job.pairs)
        tokens = 0
        for idxs, reply in zip(groups.values(), results):
            group = reply.results
            if len(group) != len(idxs):
                raise PrismError(ErrorKind.INTERNAL, f"the {model.name} scorer returned {len(group)} results "
                                                     f"for {len(idxs)} documents")
            for i, r in zip(idxs, group):
                data[i] = {"index": i, "object": "score", "score": r.score if job.use_activation else r.logit}
                tokens += r.num_tokens
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model.name,
                "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


class _Slot:
    def __init__(self, service: RerankService):
        self._service, self._held = service, True
        service.in_flight += 1

    def release(self) -> None:
        """Idempotent: the slot is given back once."""
        if self._held:
            self._held = False
            self._service.in_flight -= 1

    def __enter__(self) -> _Slot:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _best_first(ranked: list[RankedDocument]) -> list[RankedDocument]:
    return [ranked[i] for i in best_first([r.score for r in ranked])]
