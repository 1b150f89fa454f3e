"""What a rerank request means, in plain async Python: limits, model choice, ranking, cascade,
evidence targets and the order of stream events.

The tiers come in as async callables, so this module knows nothing of Ray: the Serve router passes
calls to deployment handles, tests pass plain functions. Errors are `PrismError`s of a kind
(`prism_ray.errors`); the HTTP layer maps kinds to statuses.

    service = RerankService(config, prompts, score=score_call, evidence=evidence_call)
    with service.admission():           # or: slot = service.admission(); ...; slot.release()
        model = service.prepare(job)              # sync: tokenizes; run it off the event loop
        body = await service.respond(job, model)  # or: async for event, data in service.events(...)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping

from prism_ray.api import RankedDocument, RerankJob, ScoreJob, render
from prism_ray.chunking import chunk_texts, fold, iter_chunk_documents
from prism_ray.config import AppConfig, ModelConfig
from prism_ray.errors import ErrorKind, PrismError, retry_later
from prism_ray.prompt import CUT_MARGIN_TOKENS, FIRST_CHARS_PER_TOKEN, PrismPromptTokenizer, PromptTooLong
from prism_ray.ranking import best_first, wants_evidence
from prism_ray.results import EvidenceResult
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
        self.in_flight = 0

    # -- admission ------------------------------------------------------------------------------------
    def admission(self) -> _Slot:
        """One of `max_in_flight` slots, held until released (or the end of a `with`); 429 when none is
        free. A streamed answer hands its slot to the stream, which releases it when the stream ends."""
        if self.in_flight >= self.limits.max_in_flight:
            raise retry_later(ErrorKind.OVERLOAD, f"server is at its limit of {self.limits.max_in_flight} "
                                                  "requests in flight (max_in_flight); retry later",
                              self.limits.retry_after_s)
        return _Slot(self)

    # -- model choice and limits ------------------------------------------------------------------------
    def model(self, key: str | None, param: str = "model") -> ModelConfig:
        found = self.config.find_model(key)
        if found is None:
            names = ", ".join(f"{m.name} ({m.size})" if m.size else m.name for m in self.config.models)
            raise PrismError(ErrorKind.UNKNOWN_MODEL, f"{param}: model {key!r} not found; available: {names}", param)
        return found

    def prepare(self, job: RerankJob) -> ModelConfig:
        """The model the job asks for, after every limit is checked; sets `job.model` to its name.

        Synchronous (it tokenizes the query): an async host runs it in an executor.
        """
        model = self.model(job.model)
        job.model = model.name
        lim, field = self.limits, job.documents_field
        if not job.documents:
            raise PrismError(ErrorKind.BAD_REQUEST, f"{field}: must hold at least one document", field)
        if len(job.documents) > lim.max_documents:
            raise PrismError(ErrorKind.TOO_LARGE, f"{field}: {len(job.documents)} documents; the limit is "
                                                  f"{lim.max_documents} (max_documents)", field)
        screen = self.model(job.cascade.screen, "cascade.screen") if job.cascade is not None else None
        for m in {model.name: model, **({screen.name: screen} if screen else {})}.values():
            self._check_query(job.query, m, "query")
        if job.chunking is not None:
            self._chunk(job, model)
        ev = job.evidence
        if ev is not None:
            if model.name not in self.evidence_models:
                raise PrismError(ErrorKind.BAD_REQUEST, f"evidence: model {model.name!r} has no evidence tier",
                                 "evidence")
            if ev.top_n > lim.max_evidence_documents:
                raise PrismError(ErrorKind.BAD_REQUEST, f"evidence.top_n: {ev.top_n}; the limit is "
                                                        f"{lim.max_evidence_documents} (max_evidence_documents)",
                                 "evidence.top_n")
            if ev.max_new_tokens is not None and ev.max_new_tokens > lim.max_new_tokens:
                raise PrismError(ErrorKind.BAD_REQUEST, f"evidence.max_new_tokens: {ev.max_new_tokens}; the limit "
                                                        f"is {lim.max_new_tokens} (max_new_tokens)",
                                 "evidence.max_new_tokens")
        return model

    def _check_query(self, query: str, model: ModelConfig, param: str) -> list[int]:
        """The query within max_query_chars and leaving room for a document under the model's max_length;
        returns its prefix tokens."""
        if len(query) > self.limits.max_query_chars:
            raise PrismError(ErrorKind.BAD_REQUEST, f"{param}: a query of {len(query)} characters; the limit is "
                                                    f"{self.limits.max_query_chars} (max_query_chars)", param)
        try:
            return self.prompts[model.name].encode(query, "").prefix
        except PromptTooLong as exc:
            raise PrismError(ErrorKind.BAD_REQUEST, f"{param}: {exc} of model {model.name!r}", param) from None

    def _chunk(self, job: RerankJob, model: ModelConfig) -> None:
        """Cut the job's documents into chunks (with the model's tokenizer), within the chunk limits."""
        lim, opts = self.limits, job.chunking
        if opts.max_chunks_per_doc > lim.max_chunks_per_doc:
            raise PrismError(ErrorKind.BAD_REQUEST, f"chunking.max_chunks_per_doc: {opts.max_chunks_per_doc}; the "
                                                    f"limit is {lim.max_chunks_per_doc} (max_chunks_per_doc)",
                             "chunking.max_chunks_per_doc")
        job.chunked, total = [], 0
        for chunked in iter_chunk_documents(self.prompts[model.name], job.query, job.documents,
                                            opts.max_chunks_per_doc, opts.chunk_tokens, opts.overlap_tokens,
                                            job.max_tokens_per_doc):
            total += len(chunked.chunks)
            if total > lim.max_chunks_per_request:  # refused here: the remaining documents are never read
                raise PrismError(ErrorKind.TOO_LARGE, "chunking: the documents make more chunks than the limit of "
                                                      f"{lim.max_chunks_per_request} (max_chunks_per_request)",
                                 "chunking")
            job.chunked.append(chunked)

    # -- scoring and cascade ----------------------------------------------------------------------------
    async def _score_some(self, model: ModelConfig, job: RerankJob, indices: list[int]) -> list[RankedDocument]:
        docs = [job.documents[i] for i in indices]
        chunked = None if job.chunked is None else [job.chunked[i] for i in indices]
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

    async def rank(self, job: RerankJob, model: ModelConfig) -> list[RankedDocument]:
        """Every document, best first. With a cascade, the screen model scores all of them and `model`
        re-scores the screen's top `rescore_top`, which then lead the list."""
        every = list(range(len(job.documents)))
        if job.cascade is None:
            return await self._score_some(model, job, every)
        screened = await self._score_some(self.model(job.cascade.screen, "cascade.screen"), job, every)
        top = screened[: job.cascade.rescore_top]
        rescored = await self._score_some(model, job, [r.index for r in top])
        return rescored + screened[len(top):]

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

    @staticmethod
    def _with_evidence(r: RankedDocument, out: EvidenceResult) -> RankedDocument:
        r.contribution, r.evidence, r.evidence_truncated = out.contribution, out.evidence, out.truncated
        r.generated_text = out.text
        r.has_evidence = True
        return r

    async def _evidence_one(self, job: RerankJob, model: ModelConfig, r: RankedDocument) -> RankedDocument:
        return self._with_evidence(r, await self._evidence(*await self._evidence_args(job, model, r)))

    async def respond(self, job: RerankJob, model: ModelConfig,
                      ranked: list[RankedDocument] | None = None) -> tuple[dict | list, list[RankedDocument]]:
        """The whole answer at once: the response body in the client's shape, and the ranked documents
        (pass `ranked` when the ranking is already computed)."""
        if ranked is None:
            ranked = await self.rank(job, model)
        await asyncio.gather(*(self._evidence_one(job, model, r) for r in self.evidence_targets(job, ranked)))
        return render(job, ranked, str(uuid.uuid4()), cascade=job.cascade is not None), ranked

    # -- the score API (vLLM's /score) ------------------------------------------------------------------
    def prepare_score(self, job: ScoreJob) -> tuple[ModelConfig, list[int | None]]:
        """The model, after the limits; and per pair, the document tokens `truncate_prompt_tokens` leaves
        (None: no cut beyond max_length). Sync: it tokenizes; run it off the event loop."""
        model = self.model(job.model)
        lim = self.limits
        if len(job.pairs) > lim.max_documents:
            raise PrismError(ErrorKind.TOO_LARGE, f"documents: {len(job.pairs)} pairs; the limit is "
                                                  f"{lim.max_documents} (max_documents)", "documents")
        prompts = self.prompts[model.name]
        rooms: dict[str, int | None] = {}
        for query, _ in job.pairs:
            if query in rooms:
                continue
            prefix = self._check_query(query, model, "queries")
            cap = job.truncate_prompt_tokens
            rooms[query] = None if cap is None else max(1, cap - len(prefix) - len(prompts.suffix))
        return model, [rooms[q] for q, _ in job.pairs]

    async def score_pairs(self, job: ScoreJob, model: ModelConfig, rooms: list[int | None]) -> dict:
        """vLLM's score response, in input order. Pairs are grouped by (query, document room), and every
        group goes to the scorer in one call, so several queries share the engine's forward passes."""
        groups: dict[tuple[str, int | None], list[int]] = {}
        for i, ((query, _), room) in enumerate(zip(job.pairs, rooms)):
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

    def timeout_error(self, what: str = "the request") -> PrismError:
        return PrismError(ErrorKind.TIMEOUT, f"{what} did not finish within request_timeout_s="
                                             f"{self.limits.request_timeout_s:g} seconds; its work was cancelled")

    async def events(self, job: RerankJob, model: ModelConfig, ranked: list[RankedDocument] | None = None,
                     deadline: float | None = None) -> AsyncIterator[tuple[str, dict | list]]:
        """The stream: one `scores` event (every score, ranked, no evidence yet); then, per target, its
        text as it is written (`evidence_delta` events: `index` and the `text` new since the last one, when
        the evidence tier streams) and its `evidence` event as it finishes (or an `error` event for that
        index if its generation failed); then `done`. Pass `ranked` to stream a ranking already computed (a
        host that must fail before it starts a stream does so). At `deadline` (event-loop time) the
        generations still running are cancelled and each gets an `error` event of type `timeout`: the
        stream still ends with `done`."""
        if ranked is None:
            ranked = await self.rank(job, model)
        yield "scores", render(job, ranked, str(uuid.uuid4()), cascade=job.cascade is not None)
        targets = self.evidence_targets(job, ranked)
        queue: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._evidence_events(job, model, r, queue)) for r in targets]
        open_targets = {r.index for r in targets}
        failed = 0
        loop = asyncio.get_running_loop()
        try:
            while open_targets:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    event, data = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    break
                if event != "evidence_delta":
                    open_targets.discard(data["index"])
                    failed += event == "error"
                yield event, data
            for r in (r for r in targets if r.index in open_targets):  # past the deadline, in rank order
                failed += 1
                yield "error", {"index": r.index, **self.timeout_error("evidence for this document").body()}
        finally:  # past the deadline, or a client that left mid-stream: no generation is left behind
            for t in tasks:
                t.cancel()
        yield "done", {"evidence_documents": len(targets) - failed, "failed": failed}

    async def _evidence_events(self, job: RerankJob, model: ModelConfig, r: RankedDocument,
                               queue: asyncio.Queue) -> None:
        """One target's events into `queue`: its deltas (with a streaming tier), then `evidence` or `error`."""
        try:
            args = await self._evidence_args(job, model, r)
            if self._evidence_stream is None:
                out = await self._evidence(*args)
            else:
                out = None
                async for piece in self._evidence_stream(*args):
                    if isinstance(piece, str):
                        if piece:
                            queue.put_nowait(("evidence_delta", {"index": r.index, "text": piece}))
                    else:
                        out = piece
                if out is None:
                    raise PrismError(ErrorKind.INTERNAL, "the evidence stream ended without its result")
            queue.put_nowait(("evidence", {"index": r.index, **self._with_evidence(r, out).prism_fields()}))
        except Exception as exc:  # noqa: BLE001 - one document's failure must not cut the stream
            queue.put_nowait(("error", {"index": r.index, **_error_body(exc)}))


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


def _error_body(exc: Exception) -> dict:
    if isinstance(exc, PrismError):
        return exc.body()
    return {"message": f"evidence generation failed: {type(exc).__name__}", "type": ErrorKind.INTERNAL.value,
            "param": None}
