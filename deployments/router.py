"""The HTTP router: validates, authenticates, picks the checkpoint, ranks, adds evidence, streams.

Speaks Cohere v2 (`/v2/rerank`), Jina (`/v1/rerank`, `/rerank`) and TEI (`/rerank` with `texts`).
Every caller mistake is a 4xx whose message names the field and the limit; overload is a 429 with
Retry-After, never a hang.
"""


import asyncio
import json
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from prism_ray import metrics
from prism_ray.api import (
    CohereRerankRequest, JinaRerankRequest, RankedDocument, RerankJob, TeiRerankRequest, job_from_cohere,
    job_from_jina, job_from_tei, render, server_timing,
)
from prism_ray.config import AppConfig, ModelConfig
from prism_ray.prompt import PromptTooLong

app = FastAPI(title="prism-ray", description="Prism rerankers: scores, contributions and evidence.")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None, kind: str = "bad_request"):
        super().__init__(message)
        self.status, self.message, self.headers, self.kind = status, message, headers or {}, kind


def _field(loc) -> str:
    return ".".join(str(p) for p in loc if p not in ("body",)) or "body"


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = [{"field": _field(e["loc"]), "message": e["msg"]} for e in exc.errors()]
    message = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return JSONResponse({"message": message, "errors": errors}, status_code=422)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse({"message": exc.message}, status_code=exc.status, headers=exc.headers)


_SCHEMAS: dict = {}


def _json_body(*models) -> dict:
    """OpenAPI request body for endpoints that read their JSON themselves."""
    refs = []
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        _SCHEMAS.update(schema.pop("$defs", {}))
        _SCHEMAS[model.__name__] = schema
        refs.append({"$ref": f"#/components/schemas/{model.__name__}"})
    body_schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}}}


def _openapi() -> dict:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version="0.1.0", description=app.description, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(_SCHEMAS)
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


def _parse(model, body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _sse(event: str, data) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _replica_counts() -> dict[str, int]:
    """Running replicas per deployment name, as Serve reports them (empty if unavailable)."""
    try:
        status = serve.status()
    except Exception:  # noqa: BLE001 - status is informative only
        return {}
    counts = {}
    for application in status.applications.values():
        for name, dep in application.deployments.items():
            counts[name] = sum(n for state, n in dep.replica_states.items() if str(state).endswith("RUNNING"))
    return counts


@serve.deployment
@serve.ingress(app)
class Router:
    def __init__(self, config: dict, scorers: list, evidences: list):
        self.config = AppConfig.model_validate(config)
        self.scorers = {m.name: h for m, h in zip(self.config.models, scorers)}
        self.evidences = {m.name: h for m, h in zip(self.config.models, evidences) if h is not None}
        self.keys = self.config.resolved_api_keys()
        self.limits = self.config.limits
        self.in_flight = 0
        self._prompts: dict = {}
        for m in self.config.models:  # load tokenizers now: a first request must not stall the event loop
            self._prompts_for(m)

    # -- endpoints ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        replicas = _replica_counts()
        data = []
        for m in self.config.models:
            tiers = {"scorer": {"replicas": replicas.get(f"{m.name}-scorer")}}
            if m.evidence is not None:
                tiers["evidence"] = {"replicas": replicas.get(f"{m.name}-evidence")}
            data.append({"id": m.name, "object": "model", "model": m.model, "size": m.size, "backbone": m.backbone,
                         "default": m.name == self.config.default_model, "tiers": tiers})
        return {"object": "list", "data": data}

    @app.post("/v2/rerank", openapi_extra=_json_body(CohereRerankRequest))
    async def cohere_rerank(self, request: Request):
        """Cohere v2 rerank."""
        body = await self._read_body(request)
        return await self._serve(request, job_from_cohere(_parse(CohereRerankRequest, body)), "v2/rerank")

    @app.post("/v1/rerank", openapi_extra=_json_body(JinaRerankRequest))
    async def jina_rerank(self, request: Request):
        """Jina rerank."""
        body = await self._read_body(request)
        return await self._serve(request, job_from_jina(_parse(JinaRerankRequest, body)), "v1/rerank")

    @app.post("/rerank", openapi_extra=_json_body(JinaRerankRequest, TeiRerankRequest))
    async def rerank(self, request: Request):
        """Jina body (`documents`) or TEI body (`texts`)."""
        body = await self._read_body(request)
        job = job_from_tei(_parse(TeiRerankRequest, body)) if "texts" in body \
            else job_from_jina(_parse(JinaRerankRequest, body))
        return await self._serve(request, job, "rerank")

    async def _read_body(self, request: Request) -> dict:
        """The JSON object body, whatever the content type says (`curl -d` sends a form type)."""
        self._authorize(request)
        self._check_body_size(request)
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise RequestValidationError([{"loc": ("body",), "msg": "body is not valid JSON", "type": "json_invalid"}])
        if not isinstance(body, dict):
            raise RequestValidationError([{"loc": ("body",), "msg": "body must be a JSON object", "type": "dict_type"}])
        return body

    # -- the one path every shape takes ---------------------------------------------------------------
    async def _serve(self, request: Request, job: RerankJob, endpoint: str):
        if self.in_flight >= self.limits.max_in_flight:
            metrics.count("prism_errors_total", kind="overload", model=job.model or "")
            raise ApiError(429, f"server is at its limit of {self.limits.max_in_flight} requests in flight "
                                "(max_in_flight); retry later",
                           {"Retry-After": str(self.limits.retry_after_s)}, kind="overload")
        self.in_flight += 1
        model = None
        try:
            model = self._model(job.model)
            job.model = model.name
            self._check_limits(job, model)
            if job.stream:
                ranked = await self._rank(job, model)
                return StreamingResponse(self._stream(job, model, ranked), media_type="text/event-stream")
            ranked = await self._rank(job, model)
            await self._add_evidence(job, model, ranked)
            metrics.count("prism_requests_total", model=model.name, endpoint=endpoint, status="200")
            return JSONResponse(render(job, ranked, str(uuid.uuid4()), cascade=job.cascade is not None),
                                headers={"Server-Timing": server_timing(ranked)})
        except ApiError as exc:
            metrics.count("prism_errors_total", kind=exc.kind, model=model.name if model else "")
            raise
        except Exception as exc:  # backpressure from a tier is overload, not a server bug
            if type(exc).__name__ in ("BackPressureError", "DeploymentUnavailableError"):
                metrics.count("prism_errors_total", kind="overload", model=model.name if model else "")
                raise ApiError(503, "the model's replicas are saturated; retry later",
                               {"Retry-After": str(self.limits.retry_after_s)}, kind="overload") from exc
            metrics.count("prism_errors_total", kind="internal", model=model.name if model else "")
            raise
        finally:
            self.in_flight -= 1

    def _authorize(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self.keys:
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           {"WWW-Authenticate": "Bearer"}, kind="auth")

    def _check_body_size(self, request: Request) -> None:
        length = request.headers.get("content-length", "")
        limit = self.limits.max_body_bytes
        if length.isdigit() and int(length) > limit:
            raise ApiError(413, f"body is {length} bytes; the limit is {limit} (max_body_bytes)", kind="too_large")

    def _model(self, key: str | None) -> ModelConfig:
        model = self.config.find_model(key)
        if model is None:
            names = ", ".join(f"{m.name} ({m.size})" if m.size else m.name for m in self.config.models)
            raise ApiError(404, f"model {key!r} not found; available: {names}", kind="unknown_model")
        return model

    def _prompts_for(self, model: ModelConfig):
        if model.name not in self._prompts:
            from transformers import AutoTokenizer

            from prism_ray.prompt import PrismPromptTokenizer

            tok = AutoTokenizer.from_pretrained(model.ensure_checkpoint())
            self._prompts[model.name] = PrismPromptTokenizer(tok, max_length=model.max_length)
        return self._prompts[model.name]

    def _check_limits(self, job: RerankJob, model: ModelConfig) -> None:
        lim = self.limits
        if not job.documents:
            raise ApiError(422, f"{job.documents_field}: must hold at least one document")
        if len(job.documents) > lim.max_documents:
            raise ApiError(413, f"{job.documents_field}: {len(job.documents)} documents; the limit is "
                                f"{lim.max_documents} (max_documents)")
        prompts = self._prompts_for(model)
        query_tokens = len(prompts.encode_text(job.query))
        if query_tokens > lim.max_query_tokens:
            raise ApiError(422, f"query: {query_tokens} tokens; the limit is {lim.max_query_tokens} (max_query_tokens)")
        try:
            prompts.encode(job.query, "")
        except PromptTooLong as exc:
            raise ApiError(422, f"query: {exc}") from None
        ev = job.evidence
        if ev is not None:
            if model.evidence is None and not self.evidences.get(model.name):
                raise ApiError(422, f"evidence: model {model.name!r} has no evidence tier")
            if ev.top_n > lim.max_evidence_documents:
                raise ApiError(422, f"evidence.top_n: {ev.top_n}; the limit is {lim.max_evidence_documents} "
                                    "(max_evidence_documents)")
            if ev.max_new_tokens is not None and ev.max_new_tokens > lim.max_new_tokens:
                raise ApiError(422, f"evidence.max_new_tokens: {ev.max_new_tokens}; the limit is "
                                    f"{lim.max_new_tokens} (max_new_tokens)")
        if job.cascade is not None and self.config.find_model(job.cascade.screen) is None:
            raise ApiError(404, f"cascade.screen: model {job.cascade.screen!r} not found")

    # -- scoring, cascade, evidence ------------------------------------------------------------------
    async def _score(self, model: ModelConfig, job: RerankJob, indices: list[int]) -> list[RankedDocument]:
        docs = [job.documents[i] for i in indices]
        results = await self.scorers[model.name].score.remote(job.query, docs, job.max_tokens_per_doc)
        ranked = [RankedDocument(i, r["score"], r["logit"], r["num_tokens"], r["truncated"], model.name,
                                 compute_ms=r["compute_ms"]) for i, r in zip(indices, results, strict=True)]
        if not job.truncate:
            for r in ranked:
                if r.truncated:
                    raise ApiError(413, f"{job.documents_field}.{r.index}: longer than the model's max_length of "
                                        f"{model.max_length} tokens with the prompt, and truncate is false")
        return ranked

    async def _rank(self, job: RerankJob, model: ModelConfig) -> list[RankedDocument]:
        every = list(range(len(job.documents)))
        if job.cascade is None:
            return sorted(await self._score(model, job, every), key=lambda r: -r.score)
        screen = self.config.find_model(job.cascade.screen)
        screened = sorted(await self._score(screen, job, every), key=lambda r: -r.score)
        top = [r.index for r in screened[: job.cascade.rescore_top]]
        rescored = sorted(await self._score(model, job, top), key=lambda r: -r.score)
        return rescored + screened[len(top):]

    def _evidence_targets(self, job: RerankJob, ranked: list[RankedDocument]) -> list[RankedDocument]:
        ev = job.evidence
        if ev is None:
            return []
        return [r for r in ranked[: ev.top_n] if ev.min_score is None or r.score >= ev.min_score]

    async def _evidence_one(self, job: RerankJob, model: ModelConfig, r: RankedDocument) -> RankedDocument:
        max_new = job.evidence.max_new_tokens or self.limits.max_new_tokens
        out = await self.evidences[model.name].generate.remote(job.query, job.documents[r.index], max_new)
        r.contribution, r.evidence, r.evidence_truncated = out["contribution"], out["evidence"], out["truncated"]
        r.generated_text = out["text"]
        r.has_evidence = True
        return r

    async def _add_evidence(self, job: RerankJob, model: ModelConfig, ranked: list[RankedDocument]) -> None:
        await asyncio.gather(*(self._evidence_one(job, model, r) for r in self._evidence_targets(job, ranked)))

    async def _stream(self, job: RerankJob, model: ModelConfig, ranked: list[RankedDocument]):
        """Server-Sent Events: all scores first, then one event per evidence as it finishes, then done."""
        first = render(job, ranked, str(uuid.uuid4()), cascade=job.cascade is not None)
        yield _sse("scores", first)
        tasks = [asyncio.ensure_future(self._evidence_one(job, model, r)) for r in self._evidence_targets(job, ranked)]
        for done in asyncio.as_completed(tasks):
            r = await done
            yield _sse("evidence", {"index": r.index, **r.prism_fields()})
        yield _sse("done", {"evidence_documents": len(tasks)})
