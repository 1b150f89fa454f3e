"""The API contract: OpenAPI request bodies, responses and the limits of one app's config.

The pydantic request models say what every deployment enforces (types, non-blank query, at least one
document, ranges); `apply_config` adds what one config enforces (document count, query length, the
evidence limits, the model names it serves, bearer auth when keys are set). A request the document
admits is served; one it refuses gets a 4xx from the table in `prism_ray.errors`. The one exception
is stated in the schema: `truncate: false` asks for a 413 when a document is longer than the model's
`max_length` in tokens, a bound no character count can state exactly. Where each limit goes in the
document is `prism_ray.limits`' table, which the checks share.
"""

from __future__ import annotations

import re
from copy import deepcopy

from pydantic import BaseModel

from prism_ray import limits
from prism_ray.api import STREAM_DESCRIPTION
from prism_ray.config import AppConfig, ModelConfig
from prism_ray.errors import DESCRIPTIONS, ErrorBody

REF = "#/components/schemas/{model}"
RERANK_ERRORS = (404, 408, 413, 422, 429, 503, 504)
SSE_EVENT = {  # one Server-Sent Event of a streamed answer (see RerankService.events)
    "type": "object", "required": ["event", "data"],
    "properties": {"event": {"enum": ["scores", "evidence_delta", "evidence", "error", "done"]},
                   "data": {"type": "string", "contentMediaType": "application/json"}},
}


def component_schemas(*models: type[BaseModel]) -> dict[str, dict]:
    """JSON schemas of `models` and everything they reference, keyed by component name."""
    out: dict[str, dict] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF)
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def _one_of(models) -> dict:
    refs = [_ref(m) for m in models]
    # anyOf, not oneOf: a body both shapes accept (extra fields are ignored) is served, so it is valid.
    return refs[0] if len(refs) == 1 else {"anyOf": refs}


def error_responses(statuses) -> dict:
    return {str(s): {"description": DESCRIPTIONS[s], "content": {"application/json": {"schema": _ref(ErrorBody)}}}
            for s in statuses}


def rerank_operation(requests: list[type[BaseModel]], responses: list) -> dict:
    """`openapi_extra` of a rerank endpoint that reads its JSON body itself (any content type)."""
    ok_schema = _one_of(responses) if all(isinstance(r, type) for r in responses) else responses[0]
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": _one_of(requests)}}},
        "responses": {
            "200": {"description": "Ranked results, best first. " + STREAM_DESCRIPTION,
                    "content": {"application/json": {"schema": ok_schema},
                                "text/event-stream": {"schema": SSE_EVENT}}},
            **error_responses(RERANK_ERRORS),
        },
    }


def score_operation() -> dict:
    """`openapi_extra` of the score API (vLLM's /score), which reads its JSON body itself."""
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "$ref": REF.format(model="ScoreRequest")}}}},
        "responses": {
            "200": {"description": "One score per pair, in input order",
                    "content": {"application/json": {"schema": {"$ref": REF.format(model="ScoreResponse")}}}},
            **error_responses(RERANK_ERRORS),
        },
    }


def _score_request_rules(schema: dict, model_pattern: str) -> None:
    """The score request's models, non-empty lists, and its one-of-each rule: queries or text_1, documents
    or text_2 (a null counts as absent). That a list of queries matches the documents in length is checked
    by the server (422); JSON Schema cannot state it. (Its limits are `prism_ray.limits`' spots.)"""
    props = schema["properties"]
    for field in ("queries", "text_1", "documents", "text_2"):
        for alt in props[field]["anyOf"]:
            if alt.get("type") == "array":
                alt["minItems"] = 1
    props["model"] = {"anyOf": [{"type": "string", "pattern": model_pattern}, {"type": "null"}], "default": None}

    def given(field: str) -> dict:
        return {"required": [field], "properties": {field: {"not": {"type": "null"}}}}

    schema["allOf"] = [
        {"anyOf": [given("queries"), given("text_1")]}, {"not": {"allOf": [given("queries"), given("text_1")]}},
        {"anyOf": [given("documents"), given("text_2")]}, {"not": {"allOf": [given("documents"), given("text_2")]}},
    ]


def key_pattern(keys: list[str]) -> str:
    """A regex matching exactly these strings, ASCII letters in either case (how `find_model` matches)."""
    def one(key: str) -> str:
        return "".join(f"[{c.lower()}{c.upper()}]" if c.isascii() and c.isalpha() else re.escape(c) for c in key)
    return "^(?:" + "|".join(one(k) for k in sorted(set(keys))) + ")$"


def model_keys(m: ModelConfig) -> list[str]:
    return [m.name, m.model, *([m.size] if m.size else [])]


def body_rules(lim) -> str:
    """What every request body must be, past its schema (each rule answers the status it names)."""
    return (f"A JSON object (any content type) of at most {lim.max_body_bytes} bytes whatever its framing "
            f"(max_body_bytes, 413), arriving within {lim.body_timeout_s:g} s (body_timeout_s, 408), nested at most "
            f"{lim.max_json_depth} levels (max_json_depth, 422); an integer of more than 4300 digits, a float past "
            "the 64-bit range, NaN and Infinity are refused (422). A router replica holds at most "
            f"{lim.max_in_flight_bytes} bytes of bodies at once (max_in_flight_bytes, 429).")


def apply_config(schema: dict, config: AppConfig, request_models: list[str]) -> dict:
    """A copy of `schema` stating the limits, models and auth of `config`."""
    schema = deepcopy(schema)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    lim = config.limits
    every = key_pattern([k for m in config.models for k in model_keys(m)])
    with_evidence = [m for m in config.models if m.evidence is not None]
    default_has_evidence = config.find_model(None).evidence is not None
    for name in request_models:
        props = comps[name]["properties"]
        props["query"]["description"] += f"; at most {lim.max_query_chars} characters (max_query_chars)"
        for field in ("documents", "texts"):
            if field in props:
                props[field]["description"] = f"1 to {lim.max_documents} (max_documents)"
        props["model"] = {"anyOf": [{"type": "string", "pattern": every}, {"type": "null"}], "default": None,
                          "description": "a configured model's name, checkpoint or size (any case); "
                                         "null: the default model"}
        if "truncate" in props:
            props["truncate"]["description"] = ("false: answer 413 instead of cutting a document longer than "
                                                "the model's max_length tokens")
        comps[name]["if"] = {"required": ["evidence"], "properties": {"evidence": {"type": "object"}}}
        if not with_evidence:
            comps[name]["then"] = {"properties": {"evidence": {"type": "null"}}}
        else:
            evidence_model = {"type": "string", "pattern": key_pattern([k for m in with_evidence
                                                                       for k in model_keys(m)])}
            comps[name]["then"] = (
                {"properties": {"model": {"anyOf": [evidence_model, {"type": "null"}]}}} if default_has_evidence
                else {"required": ["model"], "properties": {"model": evidence_model}})
    comps["CascadeOptions"]["properties"]["screen"]["pattern"] = every
    if "ScoreRequest" in comps:
        _score_request_rules(comps["ScoreRequest"], every)
    limits.state(comps, lim, request_models)
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            if "requestBody" in op:
                op["requestBody"]["description"] = body_rules(lim)
    if config.resolved_api_keys():
        comps_root = schema["components"]
        comps_root["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, ops in schema.get("paths", {}).items():
            if path.endswith(("/health", "/health/ready")):  # probes carry no keys
                continue
            for op in ops.values():
                if op.get("security") == []:  # declared public (the playground page)
                    continue
                op["security"] = [{"bearer": []}]
                op.setdefault("responses", {}).update(error_responses([401]))
    return schema
