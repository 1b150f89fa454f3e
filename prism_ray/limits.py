"""The limits of a request as one table: what each bounds, what passing it answers, how the error says it,
and where the OpenAPI document states it.

`LimitsConfig` (`prism_ray.config`) holds the values; this table is the only place that knows what they
mean. The service and the router check a value with `check` (or build the error with `refusal` when the
value is not a number they hold, as for a body still arriving), and `openapi.apply_config` writes every
`Spot` of every limit with the configured value, so the check, its message and the contract cannot drift
apart.

    check(config.limits, "max_documents", len(docs), "documents")
    # PrismError(too_large, "documents: 1001 documents; the limit is 1000 (max_documents)", "documents")
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prism_ray.errors import ErrorKind, PrismError

EVERY_REQUEST = "*"  # a Spot's component: each rerank request model (Cohere, Jina, TEI)
_TYPE_OF = {"maxItems": "array", "maxLength": "string", "maximum": "integer"}


@dataclass(frozen=True)
class Spot:
    """Where the OpenAPI document states a limit: `keyword` (maxItems, maxLength, maximum) on the schema at
    `path` inside `component`. An `anyOf` met on the way is entered in each alternative, and the keyword
    goes only on nodes of its type (maxItems on arrays...), so "a string or a list of strings" gets it on
    the right alternative. A path a component lacks (a request model without `texts`) states nothing."""

    component: str
    path: tuple[str, ...]
    keyword: str


@dataclass(frozen=True)
class Limit:
    """A `LimitsConfig` field, `name`, as one check sees it. `message` is formatted with `param` (the field at
    fault), `value` (what the request had), `limit` and `name`, and must name the config field, so a caller
    knows what to ask an operator for. `key`: the table's key where one field makes two checks (the
    request's deadline and a body still arriving at it); by default `name`."""

    name: str
    kind: ErrorKind
    message: str = "{param}: {value}; the limit is {limit} ({name})"
    spots: tuple[Spot, ...] = ()
    key: str = ""

    def __post_init__(self):
        if "{name}" not in self.message:
            raise ValueError(f"the message of {self.name} must name it: {self.message!r}")

    def refusal(self, limit: float, param: str | None = None, value: object = None, *,
                retry_after_s: int | None = None) -> PrismError:
        """The error for a request past this limit, whose configured value is `limit`; `retry_after_s` for a
        limit the caller may simply wait out (429)."""
        text = self.message.format(param=param, value=value, name=self.name,
                                   limit=f"{limit:g}" if isinstance(limit, float) else limit)
        headers = None if retry_after_s is None else {"Retry-After": str(retry_after_s)}
        return PrismError(self.kind, text, param, headers)


def _request(*path: str, keyword: str) -> Spot:
    return Spot(EVERY_REQUEST, ("properties", *path), keyword)


def _score(*path: str, keyword: str) -> Spot:
    return Spot("ScoreRequest", ("properties", *path), keyword)


LIMITS: dict[str, Limit] = {limit.key or limit.name: limit for limit in (
    Limit("max_documents", ErrorKind.TOO_LARGE, "{param}: {value} documents; the limit is {limit} ({name})", (
        _request("documents", keyword="maxItems"), _request("texts", keyword="maxItems"),
        *(_score(f, keyword="maxItems") for f in ("queries", "text_1", "documents", "text_2")))),
    Limit("max_query_chars", ErrorKind.BAD_REQUEST, "{param}: a query of {value} characters; the limit is {limit} ({name})",
          (
        _request("query", keyword="maxLength"),
        *(_score(f, *items, keyword="maxLength") for f in ("queries", "text_1") for items in ((), ("items",))))),
    Limit("max_evidence_documents", ErrorKind.BAD_REQUEST, spots=(
        Spot("EvidenceOptions", ("properties", "top_n"), "maximum"),)),
    Limit("max_new_tokens", ErrorKind.BAD_REQUEST, spots=(
        Spot("EvidenceOptions", ("properties", "max_new_tokens"), "maximum"),)),
    Limit("max_chunks_per_doc", ErrorKind.BAD_REQUEST, spots=(
        Spot("ChunkingOptions", ("properties", "max_chunks_per_doc"), "maximum"),)),
    # Counted while the documents are cut, and refused before the rest are read: no total to report.
    Limit("max_chunks_per_request", ErrorKind.TOO_LARGE,
          "{param}: the documents make more chunks than the limit of {limit} ({name})"),
    Limit("max_chunk_tokens_per_request", ErrorKind.TOO_LARGE,
          "{param}: the documents make {value}; the limit is {limit} tokens of chunks ({name}): ask for fewer "
          "or smaller chunks"),
    # The body's limits: checked by the router as the body arrives, stated in each operation's
    # requestBody description (`openapi.body_rules`), since JSON Schema has no keyword for them.
    Limit("max_body_bytes", ErrorKind.TOO_LARGE, "{param} is {value} bytes; the limit is {limit} ({name})"),
    Limit("body_timeout_s", ErrorKind.BODY_TIMEOUT, "the {param} did not arrive within {name}={limit} seconds"),
    Limit("max_json_depth", ErrorKind.BAD_REQUEST, "{param} is nested more than {limit} levels deep ({name})"),
    Limit("max_in_flight", ErrorKind.OVERLOAD, "server is at its limit of {limit} requests in flight ({name}); "
                                               "retry later"),
    Limit("max_in_flight_bytes", ErrorKind.OVERLOAD, "the server holds {value} bytes of request bodies; the limit "
                                                     "is {limit} ({name}); retry later"),
    Limit("request_timeout_s", ErrorKind.TIMEOUT, "{param} did not finish within {name}={limit} seconds; its work "
                                                  "was cancelled"),
    Limit("request_timeout_s", ErrorKind.BODY_TIMEOUT, "the {param} did not arrive within {name}={limit} seconds",
          key="body_deadline"),
)}


def check(limits, name: str, value: int, param: str) -> None:
    """Raise the limit's error when `value` is past `limits.<name>`."""
    limit = getattr(limits, name)
    if value > limit:
        raise LIMITS[name].refusal(limit, param, value)


def state(components: dict[str, dict], limits, request_models: list[str]) -> None:
    """Write every limit's value at its spots in `components` (OpenAPI component schemas, changed in place)."""
    for limit in LIMITS.values():
        value = getattr(limits, limit.name)
        for spot in limit.spots:
            names = request_models if spot.component == EVERY_REQUEST else [spot.component]
            for name in names:
                if name in components:
                    for node in nodes_at(components[name], spot.path):
                        if node.get("type") == _TYPE_OF[spot.keyword]:
                            node[spot.keyword] = value


def nodes_at(node: dict, path: tuple[str, ...]) -> Iterator[dict]:
    """The schema nodes a spot's `path` reaches from `node`, through every `anyOf` alternative on the way
    (a field of type "string or list" has one node per alternative)."""
    if "anyOf" in node:
        for alt in node["anyOf"]:
            yield from nodes_at(alt, path)
    elif not path:
        yield node
    elif isinstance(node.get(path[0]), dict):
        yield from nodes_at(node[path[0]], path[1:])
