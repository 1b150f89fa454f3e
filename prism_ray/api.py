"""Request and response models of the HTTP APIs: Cohere v2, Jina, TEI, plus Prism's extension.

Every wire shape is parsed into one internal `RerankJob`, so routing, limits, evidence and
streaming are written once whatever API a client speaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator


class _Request(BaseModel):
    """A request body part. Its integer fields take what JSON Schema calls an integer: an int or a float
    with no fractional part (`5.0`), never a bool or a numeric string."""

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data):
        if not isinstance(data, dict):
            return data
        ints = {name for name, f in cls.model_fields.items() if "int" in str(f.annotation)}
        return {k: int(v) if k in ints and isinstance(v, float) and v.is_integer() else v for k, v in data.items()}

# A query holds at least one character other than space, tab, CR and LF. The class is spelled out so
# that the JSON Schema regex, Python's and pydantic's agree on it (their `\s` differ).
NON_BLANK = r"[^\t\n\r ]"
Query = Annotated[StrictStr, Field(min_length=1, pattern=NON_BLANK,
                                   description="the search query; not blank")]


class TextObject(BaseModel):
    text: StrictStr


class EvidenceOptions(_Request):
    """Prism extension: generate contribution/evidence for the best documents."""

    model_config = ConfigDict(extra="forbid")
    top_n: StrictInt = Field(default=3, ge=1, description="evidence for this many of the top documents")
    min_score: StrictFloat | None = Field(default=None, ge=0, le=1, description="only documents scoring at least this")
    max_new_tokens: StrictInt | None = Field(default=None, ge=1)


class CascadeOptions(_Request):
    """Screen every document with a small checkpoint; re-score the best with the requested one."""

    model_config = ConfigDict(extra="forbid")
    screen: StrictStr
    rescore_top: StrictInt = Field(default=50, ge=1)


class ChunkingOptions(_Request):
    """Prism extension: read long documents whole. A document longer than what fits the model is cut at
    whitespace into chunks scored on their own; its score is its best chunk's, and each result says
    which span of the document that chunk is (`chunk`)."""

    model_config = ConfigDict(extra="forbid")
    max_chunks_per_doc: StrictInt = Field(ge=1, description="chunks per document, in document order; the rest "
                                                            "of a longer document is dropped (`truncated`)")
    chunk_tokens: StrictInt | None = Field(default=None, ge=1, description="tokens per chunk; default and cap: "
                                                                        "what fits max_length with the prompt")
    overlap_tokens: StrictInt | None = Field(default=None, ge=0, description="tokens consecutive chunks share "
                                                                          "(default 32, at most half a chunk)")


class _PrismExtension(_Request):
    evidence: EvidenceOptions | None = None
    cascade: CascadeOptions | None = None
    chunking: ChunkingOptions | None = None
    stream: StrictBool = False


class CohereRerankRequest(_PrismExtension):
    model: StrictStr | None = None
    query: Query
    documents: list[StrictStr | TextObject] = Field(min_length=1, description="at least one")
    top_n: StrictInt | None = Field(default=None, ge=1)
    max_tokens_per_doc: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False


class JinaRerankRequest(_PrismExtension):
    model: StrictStr | None = None
    query: Query
    documents: list[StrictStr | TextObject] = Field(min_length=1, description="at least one")
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = True
    truncate: StrictBool = True


class TeiRerankRequest(_PrismExtension):
    model: StrictStr | None = None
    query: Query
    texts: list[StrictStr] = Field(min_length=1, description="at least one")
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool = True
    truncation_direction: Literal["Right", "right"] = "Right"


class ScoreRequest(_Request):
    """vLLM's score API (`/score`, `/v1/score`): one query and a list of documents (1:N), or two lists of
    equal length scored pairwise (N:N). `queries`/`documents` and vLLM's older `text_1`/`text_2` are
    synonyms; give one of each pair."""

    model: StrictStr | None = None
    queries: Query | list[Query] | None = Field(default=None, description="a query, or one per document")
    documents: StrictStr | list[StrictStr] | None = Field(default=None, description="a document or a list")
    text_1: Query | list[Query] | None = Field(default=None, description="vLLM's older name for queries")
    text_2: StrictStr | list[StrictStr] | None = Field(default=None, description="vLLM's older name for documents")
    use_activation: StrictBool | None = Field(default=None, description="false: the raw logit l_yes - l_no "
                                                                        "instead of its sigmoid")
    truncate_prompt_tokens: StrictInt | None = Field(
        default=None, ge=1, description="cut each document so that its whole prompt holds at most this many "
                                        "tokens; the instruction and the query are never cut, so a document "
                                        "keeps at least one token")

    @model_validator(mode="after")
    def _one_of_each(self):
        for new, old in (("queries", "text_1"), ("documents", "text_2")):
            given = [f for f in (new, old) if getattr(self, f) is not None]
            if len(given) != 1:
                raise ValueError(f"give exactly one of {new} and {old}")
            value = getattr(self, given[0])
            if isinstance(value, list) and not value:
                raise ValueError(f"{given[0]}: at least one item")
        queries, documents = self.pairs_sides()
        if len(queries) != 1 and len(queries) != len(documents):
            q, d = ("queries" if self.queries is not None else "text_1"), ("documents" if self.documents is not None
                                                                          else "text_2")
            raise ValueError(f"{q} has {len(queries)} items and {d} {len(documents)}: give one query, or as many "
                             "queries as documents")
        return self

    def pairs_sides(self) -> tuple[list[str], list[str]]:
        q = self.queries if self.queries is not None else self.text_1
        d = self.documents if self.documents is not None else self.text_2
        return ([q] if isinstance(q, str) else list(q)), ([d] if isinstance(d, str) else list(d))


@dataclass
class ScoreJob:
    """A score request: (query, document) pairs in input order."""

    model: str | None
    pairs: list[tuple[str, str]]
    use_activation: bool = True
    truncate_prompt_tokens: int | None = None


def job_from_score(r: ScoreRequest) -> ScoreJob:
    queries, documents = r.pairs_sides()
    if len(queries) == 1:
        queries = queries * len(documents)
    return ScoreJob(r.model, list(zip(queries, documents)), r.use_activation is not False, r.truncate_prompt_tokens)


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float = Field(description="sigmoid(l_yes - l_no); the logit itself with use_activation false")


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: dict


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
    chunking: ChunkingOptions | None = None


def _texts(docs: list) -> list[str]:
    return [d if isinstance(d, str) else d.text for d in docs]


def job_from_cohere(r: CohereRerankRequest) -> RerankJob:
    return RerankJob("cohere", r.model, r.query, _texts(r.documents), "documents", r.top_n, True,
                     r.max_tokens_per_doc, r.return_documents, False, r.evidence, r.cascade, r.stream, r.chunking)


def job_from_jina(r: JinaRerankRequest) -> RerankJob:
    return RerankJob("jina", r.model, r.query, _texts(r.documents), "documents", r.top_n, r.truncate,
                     None, r.return_documents, False, r.evidence, r.cascade, r.stream, r.chunking)


def job_from_tei(r: TeiRerankRequest) -> RerankJob:
    return RerankJob("tei", r.model, r.query, list(r.texts), "texts", None, r.truncate,
                     None, r.return_text, r.raw_scores, r.evidence, r.cascade, r.stream, r.chunking)


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
    chunk: dict | None = None  # with chunking: {index, count, start, end} of the chunk that gave the score

    def scored_text(self, documents) -> str:
        """The text its score is for: its best chunk with chunking, else the whole document."""
        doc = documents[self.index]
        return doc if self.chunk is None else doc[self.chunk["start"]:self.chunk["end"]]

    def add_evidence(self, out) -> None:
        """Take the evidence tier's `EvidenceResult` for this document."""
        self.contribution, self.evidence, self.evidence_truncated = out.contribution, out.evidence, out.truncated
        self.generated_text, self.has_evidence = out.text, True

    def prism_fields(self) -> dict:
        out: dict = {} if self.chunk is None else {"chunk": self.chunk}
        if self.has_evidence:
            out.update(contribution=self.contribution, evidence=self.evidence,
                       evidence_truncated=self.evidence_truncated, generated_text=self.generated_text)
        return out


def render(job: RerankJob, ranked: list[RankedDocument], request_id: str, model: str, cascade: bool) -> dict | list:
    """The response body in the shape the client spoke, built as the response model the OpenAPI document
    declares for it (`CohereRerankResponse`, `JinaRerankResponse`, a list of `TeiRank`), so the reply and
    the contract cannot drift apart; only the fields a reply sets are written. `model`: the name of the
    model that ranked (Jina's reply names it)."""
    tokens = sum(r.num_tokens for r in ranked)
    shown = ranked[: job.top_n] if job.top_n else ranked
    extra_model = (lambda r: {"model": r.model}) if cascade else (lambda r: {})
    if job.shape == "tei":
        items = []
        for r in shown:
            item = {"index": r.index, "score": r.logit if job.raw_scores else r.score}
            if job.return_documents:
                item["text"] = job.documents[r.index]
            items.append(TeiRank(**item, **r.prism_fields(), **extra_model(r)).model_dump(exclude_unset=True))
        return items
    results = []
    for r in shown:
        item = {"index": r.index, "relevance_score": r.score}
        if job.return_documents:
            item["document"] = {"text": job.documents[r.index]}
        results.append(RankedResult(**item, **r.prism_fields(), **extra_model(r)))
    if job.shape == "cohere":
        meta = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                "tokens": {"input_tokens": tokens, "output_tokens": 0}}
        cut = sorted(r.index for r in ranked if r.truncated)
        if cut:
            meta["warnings"] = [f"documents.{i} was truncated: " + ("more chunks than max_chunks_per_doc; the rest "
                                                                    "was not scored" if job.chunking else
                                                                    "longer than fits the model; the rest was not scored")
                                for i in cut]
        reply = CohereRerankResponse(id=request_id, results=results, meta=meta)
    else:
        reply = JinaRerankResponse(model=model, usage={"prompt_tokens": tokens, "total_tokens": tokens},
                                   results=results)
    return reply.model_dump(exclude_unset=True)


def server_timing(ranked: list[RankedDocument], router_ms: float | None = None) -> str:
    """A Server-Timing header value: the scorer's compute for this request (tokenizing it and the
    engine calls that scored it, per model that scored it), and the router's own work (parsing the body, the
    limits, building the reply: its time less waiting for the body and the tiers), so a client can tell
    compute and the router's work from what the hops between them cost."""
    per_model: dict[str, float] = {}
    for r in ranked:
        per_model[r.model] = max(per_model.get(r.model, 0.0), r.compute_ms)
    out = f"scorer;dur={sum(per_model.values()):.1f}"
    return out if router_ms is None else f"{out}, router;dur={router_ms:.1f}"


# -- response models: the OpenAPI contract of what `render` writes ---------------------------------------

class ChunkSpan(BaseModel):
    """The best chunk of a document: `document[start:end]`, scored alone, gives the result's score."""

    index: int = Field(ge=0, description="the chunk's position among the document's chunks")
    count: int = Field(ge=1, description="chunks the document was cut into (at most max_chunks_per_doc)")
    start: int = Field(ge=0, description="character offset where the chunk starts in the document")
    end: int = Field(ge=0, description="character offset where it ends (exclusive)")


class _PrismResult(BaseModel):
    """Prism's additions to a result: present for the documents evidence was generated for; `model`
    only on a cascade (which checkpoint gave this score)."""

    chunk: ChunkSpan | None = Field(default=None, description="with chunking: the chunk that gave the score")
    contribution: str | None = Field(default=None, description="one sentence; null when the model judged it irrelevant")
    evidence: str | None = Field(default=None, description="a self-contained rewrite of the relevant part")
    evidence_truncated: bool | None = Field(default=None, description="generation hit max_new_tokens")
    generated_text: str | None = Field(default=None, description="everything the model wrote")
    model: str | None = Field(default=None, description="on a cascade: the model whose score this is")


class _RankedHead(BaseModel):
    index: int
    relevance_score: float = Field(ge=0, le=1)
    document: TextObject | None = None


class RankedResult(_PrismResult, _RankedHead):
    """A Cohere / Jina result: its own fields first, then Prism's (pydantic orders fields base first)."""


class CohereRerankResponse(BaseModel):
    id: str
    results: list[RankedResult]
    meta: dict


class JinaRerankResponse(BaseModel):
    model: str
    usage: dict
    results: list[RankedResult]


class _TeiHead(BaseModel):
    index: int
    score: float = Field(description="sigmoid score, or the raw logit with raw_scores")
    text: str | None = None


class TeiRank(_PrismResult, _TeiHead):
    """A TEI rank: its own fields first, then Prism's."""


STREAM_DESCRIPTION = (
    "With `stream: true`: Server-Sent Events. `scores` (the whole ranked response, without evidence); then, "
    "per evidence document, `evidence_delta` events as the model writes (`index` and `text`: the generated "
    "text new since the previous delta; together they make its `generated_text`) and one `evidence` event as "
    "it finishes (`index` + the Prism fields), or an `error` event for that index; then `done`.")
