"""The HTTP router: FastAPI, auth and the Ray handles around `prism_ray.service.RerankService`.

Speaks Cohere v2 (`/v2/rerank`), Jina (`/v1/rerank`, `/rerank`) and TEI (`/rerank` with `texts`).
What a request means (limits, model choice, ranking, cascade, evidence, stream events) lives in the
service; this module parses bodies, checks keys, calls the tiers through deployment handles and
turns `PrismError`s into the error table's statuses.

Under failure: every request has a deadline (`limits.request_timeout_s`, a 504 past it) that bounds
its tier calls, retries included; a tier call whose replica died or restarted is sent again
(`deployments.retries`); a deadline or a client that disconnects cancels the calls in flight (Serve
propagates the cancellation to the replica, and the evidence tier stops decoding for it).
"""

import asyncio
import contextvars
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.retries import FIRST_DELAY_S, MAX_DELAY_S, replica_lost, with_retries
from prism_ray import metrics
from prism_ray.allocator import return_large_blocks
from prism_ray.api import (
    CohereRerankRequest,
    CohereRerankResponse,
    JinaRerankRequest,
    JinaRerankResponse,
    RerankJob,
    ScoreRequest,
    ScoreResponse,
    TeiRank,
    TeiRerankRequest,
    job_from_cohere,
    job_from_jina,
    job_from_score,
    job_from_tei,
    server_timing,
)
from prism_ray.body import ByteBudget, check_declared_length, read_body
from prism_ray.config import AppConfig
from prism_ray.errors import STATUS, ErrorBody, ErrorKind, PrismError, retry_later
from prism_ray.factory import deployment_name
from prism_ray.limits import LIMITS
from prism_ray.openapi import apply_config, component_schemas, error_responses, rerank_operation, score_operation
from prism_ray.service import RerankService

REQUESTS = [CohereRerankRequest, JinaRerankRequest, TeiRerankRequest]
RESPONSES = [CohereRerankResponse, JinaRerankResponse]

# The OpenAPI document and its docs page are the Router's own routes: each app states its own config.
app = FastAPI(title="prism-ray", description="Prism rerankers: scores, contributions and evidence.",
              openapi_url=None, docs_url=None, redoc_url=None)


def _field(loc) -> str:
    return ".".join(str(p) for p in loc if p not in ("body",)) or "body"


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = [(_field(e["loc"]), e["msg"]) for e in exc.errors()]
    message = "; ".join(f"{field}: {msg}" for field, msg in errors)
    body = ErrorBody(message=message, type=ErrorKind.BAD_REQUEST, param=errors[0][0] if errors else None)
    return JSONResponse(body.model_dump(mode="json"), status_code=422)


@app.exception_handler(PrismError)
async def _prism_error(request: Request, exc: PrismError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _parse(model, body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _sse(event: str, data) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class TierClock:
    """The wall time a request spends waiting on others: its body arriving (in a Serve replica, fetched from
    the proxy) and its tier calls (any number at once counts once), so that the router can report its own
    work apart: `Server-Timing: router;dur=` is the request's time in the router less these waits."""

    def __init__(self):
        self.started = time.perf_counter()
        self.outstanding, self.waited, self._since = 0, 0.0, 0.0

    def enter(self) -> None:
        if self.outstanding == 0:
            self._since = time.perf_counter()
        self.outstanding += 1

    def leave(self) -> None:
        self.outstanding -= 1
        if self.outstanding == 0:
            self.waited += time.perf_counter() - self._since

    def own_ms(self) -> float:
        return 1000 * (time.perf_counter() - self.started - self.waited)


class _InFlight:
    """One request's deadline (event-loop time, from its arrival: reading the body counts), the body bytes
    it holds of the replica's budget, its admission slot once the body is in, its model name for the
    metrics (only ever a configured model's name, never what the caller sent), and its TierClock."""

    def __init__(self, deadline: float, budget: ByteBudget):
        self.deadline, self.budget, self.body_bytes = deadline, budget, 0
        self.slot, self.model, self.handed_over = None, "", False
        self.clock = TierClock()

    def hand_over(self) -> None:
        """A stream takes over the slot and the body bytes, and releases them when it ends."""
        self.handed_over = True

    def release(self) -> None:
        """Idempotent: the slot and the body bytes are given back once."""
        if self.slot is not None:
            self.slot.release()
        self.budget.give(self.body_bytes)
        self.body_bytes = 0


def _prism_cause(exc: BaseException) -> PrismError | None:
    """The PrismError a replica raised, under Ray's wrapping (a RayTaskError whose `cause` it is)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(exc, PrismError) and not isinstance(cause, BaseException):
            return exc
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    return None


def key_matches(token: str, keys) -> bool:
    """Whether `token` is one of `keys`, in time that does not depend on where they differ (every key is
    compared, each with `hmac.compare_digest`), so a caller cannot find a key byte by byte from timings."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


class _NumberOutOfRange(ValueError):
    pass


_MAX_INT_DIGITS = 4300  # sys.get_int_max_str_digits()'s default


def _int(text: str) -> int:
    """An integer of any size the parser's own bound admits (Python's 4,300 digits, past which `int`
    fails): a field's own range is its schema's to check, and an ignored field's is no concern."""
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _NumberOutOfRange(f"an integer of {len(text.lstrip('-'))} digits is out of range (at most "
                                f"{_MAX_INT_DIGITS} digits)")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NumberOutOfRange(f"the number {text[:40]} is out of range (past a 64-bit float)")
    return value


def _constant(name: str):
    raise _NumberOutOfRange(f"{name} is not a JSON number")


def _deeper_than(value, limit: int) -> bool:
    """Whether containers nest more than `limit` levels in `value` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in (node.values() if isinstance(node, dict) else node):
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def parse_json_object(raw: bytes, max_depth: int = 32) -> dict:
    """The body as a JSON object; anything else is a 422 naming what is wrong (never a 500): not UTF-8,
    not JSON, nested more than `max_depth` levels (`limits.max_json_depth`), a float past the 64-bit range
    or an integer past 4,300 digits, NaN or Infinity, a top level other than an object."""
    def invalid(msg: str, kind: str) -> RequestValidationError:
        return RequestValidationError([{"loc": ("body",), "msg": msg, "type": kind}])

    too_deep = invalid(LIMITS["max_json_depth"].refusal(max_depth, "body").message, "json_invalid")
    try:
        body = json.loads(raw, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise too_deep from None
    except _NumberOutOfRange as exc:
        raise invalid(str(exc), "json_invalid") from None
    except ValueError:  # UnicodeDecodeError (not UTF-8) is a ValueError too
        raise invalid("body is not valid JSON (UTF-8)", "json_invalid") from None
    if not isinstance(body, dict):
        raise invalid("body must be a JSON object", "dict_type")
    if _deeper_than(body, max_depth):
        raise too_deep
    return body


def _count_failure(kind: ErrorKind, endpoint: str, model: str) -> None:
    """A failed request in both request metrics: by status (next to the 200s) and by error kind."""
    metrics.count("prism_requests_total", model=model, endpoint=endpoint, status=str(STATUS[kind]))
    metrics.count("prism_errors_total", kind=kind.value, model=model)


def readiness(config: AppConfig, replicas: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """Running replicas of every tier, and the tiers that should have one and have none. A tier whose
    minimum is 0 (scale to zero) starts on demand, so it does not hold readiness back."""
    tiers, missing = {}, []
    for m in config.models:
        for tier, cfg in (("scorer", m.scorer), ("evidence", m.evidence)):
            if cfg is None:
                continue
            name = deployment_name(m.name, tier)
            tiers[name] = replicas.get(name, 0)
            if tiers[name] < 1 and cfg.min_replicas >= 1:
                missing.append(name)
    return tiers, sorted(missing)


def _replica_counts(app_name: str) -> dict[str, int]:
    """Running replicas per deployment of this application (two apps may name deployments alike), as
    Serve reports them; empty if unavailable. Blocking."""
    try:
        application = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - status is informative only
        return {}
    if application is None:
        return {}
    return {name: sum(n for state, n in dep.replica_states.items() if str(state).endswith("RUNNING"))
            for name, dep in application.deployments.items()}


def _load_prompts(config: AppConfig) -> dict:
    from transformers import AutoTokenizer

    from prism_ray.prompt import PrismPromptTokenizer

    return {m.name: PrismPromptTokenizer(AutoTokenizer.from_pretrained(m.model), max_length=m.max_length)
            for m in config.models}


def _openapi() -> dict:
    """The config-free document (what every app shares); each Router serves it with its config applied."""
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version="0.1.0", description=app.description, routes=app.routes)
    schema.setdefault("components", {}).setdefault("schemas", {}).update(
        component_schemas(*REQUESTS, *RESPONSES, TeiRank, ErrorBody, ScoreRequest, ScoreResponse))
    return schema


@serve.deployment
@serve.ingress(app)
class Router:
    def __init__(self, config: dict, scorers: list, evidences: list):
        self.config = AppConfig.model_validate(config)
        return_large_blocks()  # a body's memory goes back to the system when its request ends
        self.scorers = {m.name: h for m, h in zip(self.config.models, scorers)}
        self.evidences = {m.name: h for m, h in zip(self.config.models, evidences) if h is not None}
        self.keys = self.config.resolved_api_keys()
        self._chunking_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prism-chunking")
        self.body_budget = ByteBudget(self.config.limits.max_in_flight_bytes, self.config.limits.retry_after_s)
        self.app_name = serve.get_replica_context().app_name
        # The request's TierClock, seen by its tier calls (made here, not at import: Serve pickles the class).
        self._clock: contextvars.ContextVar[TierClock | None] = contextvars.ContextVar("prism_tier_clock", default=None)
        # Tokenizers load now: a first request must not stall the event loop.
        self.service = RerankService(self.config, _load_prompts(self.config), score=self._call_scorer,
                                     evidence=self._call_evidence, evidence_models=set(self.evidences),
                                     score_groups=self._call_scorer_groups, evidence_stream=self._stream_evidence)
        self._openapi = apply_config(_openapi(), self.config, [m.__name__ for m in REQUESTS])

    # -- the tiers, as the service sees them ------------------------------------------------------------
    async def _call_scorer(self, model: str, query: str, documents: list[str], max_doc_tokens):
        return await self._tier_call(model, "scorer",
                                     lambda: self.scorers[model].score.remote(query, documents, max_doc_tokens))

    async def _call_scorer_groups(self, model: str, groups: list):
        return await self._tier_call(model, "scorer", lambda: self.scorers[model].score_groups.remote(groups))

    async def _call_evidence(self, model: str, query: str, document: str, max_new_tokens: int):
        return await self._tier_call(model, "evidence",
                                     lambda: self.evidences[model].generate.remote(query, document, max_new_tokens))

    async def _tier_call(self, model: str, tier: str, send):
        """`send()` makes the handle call; it is sent again while its replica is lost (until the deadline
        the caller runs under). A saturated or replica-less tier is a 503 with Retry-After."""
        def retried(exc: BaseException) -> None:
            metrics.count("prism_retries_total", model=model, tier=tier)

        async def once():
            response = send()
            try:
                return await response
            except asyncio.CancelledError:
                # Serve cancels a handle call when the HTTP request it serves is cancelled, but not when
                # only this task is (the deadline, a stream's pending evidence): cancel it explicitly.
                response.cancel()
                raise

        clock = self._clock.get()
        if clock is not None:
            clock.enter()
        try:
            return await with_retries(once, retried)
        except Exception as exc:
            raise self._tier_error(exc) from None
        finally:
            if clock is not None:
                clock.leave()

    async def _stream_evidence(self, model: str, query: str, document: str, max_new_tokens: int):
        """The evidence replica's `generate_stream`: text pieces, then the result dict. Sent again while its
        replica is lost, as `_tier_call` does; a generation that restarts on another replica writes the same
        greedy text (`deployments.retries`), so only what goes past the text already passed on is passed on
        (the result's `text` is the whole answer either way)."""
        delay = FIRST_DELAY_S
        sent = ""  # text passed on so far, over every attempt
        while True:
            gen = None
            finished = False
            try:
                gen = self.evidences[model].options(stream=True).generate_stream.remote(query, document, max_new_tokens)
                written = ""
                async for item in gen:
                    if not isinstance(item, str):
                        yield item
                        continue
                    written += item
                    if len(written) > len(sent):
                        piece, sent = written[len(sent):], written
                        yield piece
                finished = True
                return
            except Exception as exc:
                if not replica_lost(exc):
                    raise self._tier_error(exc) from None
                metrics.count("prism_retries_total", model=model, tier="evidence")
            finally:  # cancelled, failed, or its reader left mid-stream: the replica stops generating
                if gen is not None and not finished:
                    gen.cancel()
            await asyncio.sleep(delay)
            delay = min(2 * delay, MAX_DELAY_S)

    def _tier_error(self, exc: Exception) -> Exception:
        """What a failed tier call means to the caller: a saturated or replica-less tier, or a full evidence
        scheduler (the replica's `saturated` PrismError, wrapped by Ray), is a 503 with Retry-After."""
        retry_after = self.config.limits.retry_after_s
        if isinstance(exc, (BackPressureError, DeploymentUnavailableError)):
            return retry_later(ErrorKind.SATURATED, "the model's replicas are saturated or starting; retry later",
                               retry_after)
        cause = _prism_cause(exc)
        if cause is not None and cause.kind == ErrorKind.SATURATED:
            return retry_later(ErrorKind.SATURATED, cause.message, retry_after)
        return cause or exc

    # -- endpoints ----------------------------------------------------------------------------------------
    @app.get("/health", responses={200: {"description": "The router is alive (cheap liveness)"}})
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/health/ready", responses={
        200: {"description": "Every configured tier has at least one running replica"},
        **error_responses([503])})
    async def ready(self) -> dict:
        """Readiness for a load balancer or a KubeRay probe: 503 until every tier of every model has a
        running replica (tiers configured to scale to zero excepted), naming the tiers that have none."""
        replicas = await asyncio.get_running_loop().run_in_executor(None, _replica_counts, self.app_name)
        tiers, missing = readiness(self.config, replicas)
        if missing:
            raise retry_later(ErrorKind.SATURATED, f"not ready: no running replica for {', '.join(missing)}",
                              self.config.limits.retry_after_s)
        return {"status": "ready", "replicas": tiers}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> dict:
        """The contract of this app: the limits, models and auth of its config; an app under a route
        prefix names it as its server, so clients and fuzzers call the right paths."""
        root = request.scope.get("root_path", "")
        return {**self._openapi, "servers": [{"url": root}]} if root else self._openapi

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json",
                                   title="prism-ray")

    @app.get("/playground", response_class=HTMLResponse, openapi_extra={"security": []},
             responses={200: {"description": "The playground: a self-contained HTML page that ranks with this app "
                                             "(it asks for the API key itself, so it is served without one)"}})
    async def playground_page(self) -> HTMLResponse:
        from prism_ray import playground

        return HTMLResponse(playground.page(), headers={"Content-Security-Policy": playground.CSP})

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        replicas = await asyncio.get_running_loop().run_in_executor(None, _replica_counts, self.app_name)
        data = []
        for m in self.config.models:
            tiers = {"scorer": {"replicas": replicas.get(deployment_name(m.name, "scorer"))}}
            if m.evidence is not None:
                tiers["evidence"] = {"replicas": replicas.get(deployment_name(m.name, "evidence"))}
            data.append({"id": m.name, "object": "model", "model": m.model, "size": m.size, "backbone": m.backbone,
                         "default": m.name == self.config.default_model, "tiers": tiers})
        return {"object": "list", "data": data}

    @app.post("/v2/rerank", openapi_extra=rerank_operation([CohereRerankRequest], [CohereRerankResponse]))
    async def cohere_rerank(self, request: Request):
        """Cohere v2 rerank."""
        return await self._serve(request, lambda body: job_from_cohere(_parse(CohereRerankRequest, body)),
                                 "v2/rerank")

    @app.post("/v1/rerank", openapi_extra=rerank_operation([JinaRerankRequest], [JinaRerankResponse]))
    async def jina_rerank(self, request: Request):
        """Jina rerank."""
        return await self._serve(request, lambda body: job_from_jina(_parse(JinaRerankRequest, body)), "v1/rerank")

    @app.post("/rerank", openapi_extra=rerank_operation(
        [JinaRerankRequest, TeiRerankRequest], [{"anyOf": [{"$ref": "#/components/schemas/JinaRerankResponse"},
                                                           {"type": "array", "items": {
                                                               "$ref": "#/components/schemas/TeiRank"}}]}]))
    async def rerank(self, request: Request):
        """Jina body (`documents`) or TEI body (`texts`)."""
        return await self._serve(request, lambda body: job_from_tei(_parse(TeiRerankRequest, body)) if "texts" in body
                                 else job_from_jina(_parse(JinaRerankRequest, body)), "rerank")

    @app.post("/score", openapi_extra=score_operation())
    async def score(self, request: Request):
        """vLLM's score API: one query and N documents, or N pairs."""
        return await self._serve_score(request, "score")

    @app.post("/v1/score", openapi_extra=score_operation())
    async def score_v1(self, request: Request):
        """vLLM's score API (OpenAI-style path)."""
        return await self._serve_score(request, "v1/score")

    async def _serve_score(self, http: Request, endpoint: str):
        loop = asyncio.get_running_loop()

        async def work(body: dict, request: _InFlight):
            job = job_from_score(_parse(ScoreRequest, body))
            prepared = await loop.run_in_executor(None, self.service.prepare_score, job)
            request.model = prepared.model.name
            return JSONResponse(await self.service.score_pairs(job, prepared))

        return await self._accounted(http, endpoint, work)

    async def _read_body(self, http: Request, request: _InFlight) -> dict:
        """The JSON object body, whatever the content type says (`curl -d` sends a form type). The body is
        read in pieces and refused (413) as soon as it passes `max_body_bytes`, whatever its framing: a
        `Content-Length` over the limit before a byte is read, a chunked body when its bytes pass it. It
        must arrive within `body_timeout_s` and the request's deadline (408), and its bytes are held
        against `max_in_flight_bytes` (429) until the request ends."""
        lim = self.config.limits
        check_declared_length(http.headers.get("content-length", ""), lim.max_body_bytes)
        request.clock.enter()
        try:
            raw = await read_body(http.stream(), lim, self.body_budget, request.deadline)
        finally:
            request.clock.leave()
        request.body_bytes = len(raw)
        return parse_json_object(raw, lim.max_json_depth)

    # -- the one path every request takes ------------------------------------------------------------------
    async def _serve(self, http: Request, parse, endpoint: str):
        """A rerank request in any shape (`parse(body)` makes its job): ranked, with evidence, plain or streamed."""
        loop = asyncio.get_running_loop()

        async def work(body: dict, request: _InFlight):
            job: RerankJob = parse(body)
            if job.chunking is None:
                # Only the query is tokenized, and it is within max_query_chars before it is: well under a
                # millisecond, less than a hop to a thread and back costs on a busy replica.
                prepared = self.service.prepare(job)
            else:
                # Chunking reads up to max_chunks_per_doc x chunk_tokens tokens of each document: one such job
                # at a time per router, on its own thread, so a burst of them bounds its memory and leaves a
                # core to everything else (one still waiting at its deadline is dropped unstarted).
                prepared = await loop.run_in_executor(self._chunking_pool, self.service.prepare, job)
            request.model = prepared.model.name
            ranked = await self.service.rank(job, prepared)
            if job.stream:
                request.hand_over()  # the stream holds the slot and the body's bytes until it ends
                return StreamingResponse(self._stream(job, prepared, ranked, request, endpoint),
                                         media_type="text/event-stream")
            body, ranked = await self.service.respond(job, prepared, ranked)
            return JSONResponse(body, headers={"Server-Timing": server_timing(ranked, request.clock.own_ms())})

        return await self._accounted(http, endpoint, work)

    async def _accounted(self, http: Request, endpoint: str, work):
        """The key, the body, admission, the deadline and the request metrics around `await work(body,
        request)`: the deadline runs from arrival, a slot is taken once the body is in, a 504 past the
        deadline, every outcome counted by status and error kind, the slot and the body's bytes released
        unless handed over to a stream."""
        self._authorize(http)
        request = _InFlight(asyncio.get_running_loop().time() + self.config.limits.request_timeout_s,
                            self.body_budget)
        self._clock.set(request.clock)
        try:
            body = await self._read_body(http, request)
            request.slot = self.service.admission()
            async with asyncio.timeout_at(request.deadline):
                response = await work(body, request)
            if not isinstance(response, StreamingResponse):  # a stream counts itself when it ends
                metrics.count("prism_requests_total", model=request.model, endpoint=endpoint, status="200")
            return response
        except TimeoutError:
            _count_failure(ErrorKind.TIMEOUT, endpoint, request.model)
            raise self.service.timeout_error() from None
        except PrismError as exc:
            _count_failure(exc.kind, endpoint, request.model)
            raise
        except RequestValidationError:
            _count_failure(ErrorKind.BAD_REQUEST, endpoint, request.model)
            raise
        except Exception:
            _count_failure(ErrorKind.INTERNAL, endpoint, request.model)
            raise
        finally:
            if not request.handed_over:
                request.release()

    async def _stream(self, job, prepared, ranked, request: _InFlight, endpoint: str):
        try:
            async for event, data in self.service.events(job, prepared, ranked, deadline=request.deadline):
                yield _sse(event, data)
            metrics.count("prism_requests_total", model=prepared.model.name, endpoint=endpoint, status="200")
        finally:
            request.release()

    def _authorize(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not key_matches(token.strip(), self.keys):
            raise PrismError(ErrorKind.AUTH, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                             "Authorization", {"WWW-Authenticate": "Bearer"})
