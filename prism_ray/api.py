"""Request and response models of the HTTP APIs: Cohere v2, Jina, TEI, plus Prism's extension.

Every wire shape is parsed into one internal `RerankJob`, so routing, limits, evidence and
streaming are written once whatever API a client speaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator


class TextObject(BaseModel):
    text: StrictStr


class EvidenceOptions(BaseModel):
    """Prism extension: generate contribution/evidence for the best documents."""

    model_config = ConfigDict(extra="forbid")
    top_n: StrictInt = Field(default=3, ge=1, description="evidence for this many of the top documents")
    min_score: float | None = Field(default=None, ge=0, le=1, description="only documents scoring at least this")
    max_new_tokens: StrictInt | None = Field(default=None, ge=1)


class CascadeOptions(BaseModel):
    """Screen every document with a small checkpoint; re-score the best with the requested one."""

    model_config = ConfigDict(extra="forbid")
    screen: StrictStr
    rescore_top: StrictInt = Field(default=50, ge=1)


class _PrismExtension(BaseModel):
    evidence: EvidenceOptions | None = None
    cascade: CascadeOptions | None = None
    stream: StrictBool = False


def _non_empty(v: str) -> str:
    if not v.strip():
        raise ValueError("query must not be empty")
    return v


class CohereRerankRequest(_PrismExtension):
    model: StrictStr | None = None
    query: StrictStr
    documents: list[StrictStr | TextObject]
    top_n: StrictInt | None = Field(default=None, ge=1)
    max_tokens_per_doc: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False

    _query = field_validator("query")(_non_empty)


class JinaRerankRequest(_PrismExtension):
    model: StrictStr | None = None
    query: StrictStr
    documents: list[StrictStr | TextObject]
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = True
    truncate: StrictBool = True

    _query = field_validator("query")(_non_empty)


class TeiRerankRequest(_PrismExtension):
    model: StrictStr | None = None
    query: StrictStr
    texts: list[StrictStr]
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool = True
    truncation_direction: Literal["Right", "right"] = "Right"

    _query = field_validator("query")(_non_empty)


@dataclass
class RerankJob:
    """What every API shape becomes."""

    shape: Literal["cohere", "jina", "tei"]
    model: str | None
    query: str
    documents: list[str]
    documents_field: str
    top_n: int | None = None
    truncate: bool = True
    max_tokens_per_doc: int | None = None
    return_documents: bool = False
    raw_scores: bool = False
    evidence: EvidenceOptions | None = None
    cascade: CascadeOptions | None = None
    stream: bool = False


def _texts(docs: list) -> list[str]:
    return [d if isinstance(d, str) else d.text for d in docs]


def job_from_cohere(r: CohereRerankRequest) -> RerankJob:
    return RerankJob("cohere", r.model, r.query, _texts(r.documents), "documents", r.top_n, True,
                     r.max_tokens_per_doc, r.return_documents, False, r.evidence, r.cascade, r.stream)


def job_from_jina(r: JinaRerankRequest) -> RerankJob:
    return RerankJob("jina", r.model, r.query, _texts(r.documents), "documents", r.top_n, r.truncate,
                     None, r.return_documents, False, r.evidence, r.cascade, r.stream)


def job_from_tei(r: TeiRerankRequest) -> RerankJob:
    return RerankJob("tei", r.model, r.query, list(r.texts), "texts", None, r.truncate,
                     None, r.return_text, r.raw_scores, r.evidence, r.cascade, r.stream)


@dataclass
class RankedDocument:
    """One document's outcome, before it is rendered into an API shape."""

    index: int
    score: float
    logit: float
    num_tokens: int
    truncated: bool
    model: str
    contribution: str | None = None
    evidence: str | None = None
    evidence_truncated: bool | None = None
    generated_text: str | None = None
    has_evidence: bool = False
    compute_ms: float = 0.0  # the scorer's compute for it: tokenizing the request + the engine call

    def prism_fields(self) -> dict:
        out: dict = {}
        if self.has_evidence:
            out.update(contribution=self.contribution, evidence=self.evidence,
                       evidence_truncated=self.evidence_truncated, generated_text=self.generated_text)
        return out


def render(job: RerankJob, ranked: list[RankedDocument], request_id: str, cascade: bool) -> dict | list:
    """The response body in the shape the client spoke."""
    tokens = sum(r.num_tokens for r in ranked)
    shown = ranked[: job.top_n] if job.top_n else ranked
    extra_model = (lambda r: {"model": r.model}) if cascade else (lambda r: {})
    if job.shape == "tei":
        items = []
        for r in shown:
            item = {"index": r.index, "score": r.logit if job.raw_scores else r.score}
            if job.return_documents:
                item["text"] = job.documents[r.index]
            items.append({**item, **r.prism_fields(), **extra_model(r)})
        return items
    results = []
    for r in shown:
        item = {"index": r.index, "relevance_score": r.score}
        if job.return_documents:
            item["document"] = {"text": job.documents[r.index]}
        results.append({**item, **r.prism_fields(), **extra_model(r)})
    if job.shape == "cohere":
        return {"id": request_id, "results": results,
                "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                         "tokens": {"input_tokens": tokens, "output_tokens": 0}}}
    return {"model": job.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": results}


def server_timing(ranked: list[RankedDocument]) -> str:
    """A Server-Timing header value: the scorer's compute for this request (tokenizing it and the
    slowest engine call, per model that scored it), so a client can tell compute from the serving
    path's own cost."""
    per_model: dict[str, float] = {}
    for r in ranked:
        per_model[r.model] = max(per_model.get(r.model, 0.0), r.compute_ms)
    return f"scorer;dur={sum(per_model.values()):.1f}"
