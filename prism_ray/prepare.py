"""What a request asks for, decided before any tier is called: the model (and the cascade's screen), every
limit checked (`prism_ray.limits`), and with chunking the documents' chunks.

The job is never changed: what was decided comes back as a `Prepared` (rerank) or a `PreparedScore` (the
score API), and the service takes it from there. Synchronous: it tokenizes the query (and with chunking
the documents), so an async host runs it in an executor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prism_ray.api import RerankJob, ScoreJob
from prism_ray.chunking import ChunkedDocument, chunk_size, iter_chunk_documents
from prism_ray.config import AppConfig, ModelConfig
from prism_ray.errors import ErrorKind, PrismError
from prism_ray.limits import LIMITS, check
from prism_ray.prompt import PrismPromptTokenizer, PromptTooLong


@dataclass(frozen=True)
class Prepared:
    """A rerank job's decisions: the model that ranks, the cascade's screen model (or None), and per
    document its chunks (None without chunking)."""

    model: ModelConfig
    screen: ModelConfig | None = None
    chunked: list[ChunkedDocument] | None = None


@dataclass(frozen=True)
class PreparedScore:
    """A score job's decisions: the model, and per pair the document tokens `truncate_prompt_tokens`
    leaves (None: no cut beyond max_length)."""

    model: ModelConfig
    rooms: list[int | None]


class Preparer:
    """Model choice and limits for one app's config; `prompts` counts each model's tokens and
    `evidence_models` names the models that have an evidence tier."""

    def __init__(self, config: AppConfig, prompts: Mapping[str, PrismPromptTokenizer], evidence_models: set[str]):
        self.config, self.limits, self.prompts, self.evidence_models = config, config.limits, prompts, evidence_models

    def model(self, key: str | None, param: str = "model") -> ModelConfig:
        found = self.config.find_model(key)
        if found is None:
            names = ", ".join(f"{m.name} ({m.size})" if m.size else m.name for m in self.config.models)
            raise PrismError(ErrorKind.UNKNOWN_MODEL, f"{param}: model {key!r} not found; available: {names}", param)
        return found

    def rerank(self, job: RerankJob) -> Prepared:
        model = self.model(job.model)
        field = job.documents_field
        if not job.documents:
            raise PrismError(ErrorKind.BAD_REQUEST, f"{field}: must hold at least one document", field)
        check(self.limits, "max_documents", len(job.documents), field)
        screen = self.model(job.cascade.screen, "cascade.screen") if job.cascade is not None else None
        for m in {model.name: model, **({screen.name: screen} if screen else {})}.values():
            self.query_prefix(job.query, m, "query")
        chunked = self._chunk(job, model) if job.chunking is not None else None
        ev = job.evidence
        if ev is not None:
            if model.name not in self.evidence_models:
                raise PrismError(ErrorKind.BAD_REQUEST, f"evidence: model {model.name!r} has no evidence tier",
                                 "evidence")
            check(self.limits, "max_evidence_documents", ev.top_n, "evidence.top_n")
            if ev.max_new_tokens is not None:
                check(self.limits, "max_new_tokens", ev.max_new_tokens, "evidence.max_new_tokens")
        return Prepared(model, screen, chunked)

    def score(self, job: ScoreJob) -> PreparedScore:
        model = self.model(job.model)
        check(self.limits, "max_documents", len(job.pairs), "documents")
        prompts = self.prompts[model.name]
        rooms: dict[str, int | None] = {}
        for query, _ in job.pairs:
            if query in rooms:
                continue
            prefix = self.query_prefix(query, model, "queries")
            cap = job.truncate_prompt_tokens
            rooms[query] = None if cap is None else max(1, cap - len(prefix) - len(prompts.suffix))
        return PreparedScore(model, [rooms[q] for q, _ in job.pairs])

    def query_prefix(self, query: str, model: ModelConfig, param: str) -> list[int]:
        """The query within max_query_chars and leaving room for a document under the model's max_length;
        returns its prefix tokens."""
        check(self.limits, "max_query_chars", len(query), param)
        try:
            return self.prompts[model.name].encode(query, "").prefix
        except PromptTooLong as exc:
            raise PrismError(ErrorKind.BAD_REQUEST, f"{param}: {exc} of model {model.name!r}", param) from None

    def _chunk(self, job: RerankJob, model: ModelConfig) -> list[ChunkedDocument]:
        """The job's documents cut into chunks (with the model's tokenizer), within the chunk limits."""
        opts = job.chunking
        check(self.limits, "max_chunks_per_doc", opts.max_chunks_per_doc, "chunking.max_chunks_per_doc")
        prompts, lim = self.prompts[model.name], self.limits
        # Each chunk holds at most `size` tokens, so the token budget allows this many chunks in all.
        size = chunk_size(prompts, job.query, opts.chunk_tokens, job.max_tokens_per_doc)
        by_tokens = lim.max_chunk_tokens_per_request // size
        most = min(lim.max_chunks_per_request, by_tokens)
        out, total = [], 0
        for chunked in iter_chunk_documents(prompts, job.query, job.documents, opts.max_chunks_per_doc,
                                            opts.chunk_tokens, opts.overlap_tokens, job.max_tokens_per_doc,
                                            max_chunks_in_all=most):
            total += len(chunked.chunks)
            if total > most:  # refused here: the rest of this document and the remaining ones are never read
                if total > lim.max_chunks_per_request:
                    raise LIMITS["max_chunks_per_request"].refusal(lim.max_chunks_per_request, "chunking")
                raise LIMITS["max_chunk_tokens_per_request"].refusal(
                    lim.max_chunk_tokens_per_request, "chunking", f"more than {by_tokens} chunks of up to {size} tokens")
            out.append(chunked)
        return out
