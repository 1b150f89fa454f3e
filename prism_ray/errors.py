"""Errors as a table: one enum of kinds, one kind -> HTTP status table, one body.

Every error the HTTP API returns has the body `{"message": ..., "type": <kind>, "param": <field or null>}`.
`message` stays top-level because Cohere and Jina clients read it; `type` is the kind below, so a
client can branch on it without parsing prose; `param` names the request field at fault.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field


class ErrorKind(str, Enum):
    BAD_REQUEST = "bad_request"  # the request breaks the schema or a limit stated in it
    AUTH = "auth"  # missing or wrong API key
    UNKNOWN_MODEL = "unknown_model"  # `model` (or cascade.screen) names no configured model
    TOO_LARGE = "too_large"  # body, document count or a document's length over a limit
    BODY_TIMEOUT = "body_timeout"  # the body did not arrive within limits.body_timeout_s
    OVERLOAD = "overload"  # this router holds max_in_flight requests already
    SATURATED = "saturated"  # a tier's replicas and queues are full, or it has no replica
    TIMEOUT = "timeout"  # the request passed limits.request_timeout_s; its downstream work was cancelled
    INTERNAL = "internal"  # a bug: never the caller's fault


STATUS: dict[ErrorKind, int] = {
    ErrorKind.BAD_REQUEST: 422,
    ErrorKind.AUTH: 401,
    ErrorKind.UNKNOWN_MODEL: 404,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.BODY_TIMEOUT: 408,
    ErrorKind.OVERLOAD: 429,
    ErrorKind.SATURATED: 503,
    ErrorKind.TIMEOUT: 504,
    ErrorKind.INTERNAL: 500,
}

DESCRIPTIONS: dict[int, str] = {
    401: "Missing or invalid API key (`Authorization: Bearer <key>`)",
    404: "The model (or cascade.screen) names no configured model",
    408: "The body did not arrive within body_timeout_s (or the request's deadline); send it faster",
    413: "Body, document count or (with truncate false) a document over its limit",
    422: "The request breaks the schema or a limit; `param` names the field",
    429: "The router is at max_in_flight requests or max_in_flight_bytes of bodies; retry after "
         "Retry-After seconds",
    503: "The model's replicas are saturated or starting; retry after Retry-After seconds",
    504: "The request passed its deadline (request_timeout_s); its work was cancelled",
}


class ErrorBody(BaseModel):
    """The body of every 4xx/5xx answer."""

    message: str = Field(description="what is wrong and what to change")
    type: ErrorKind = Field(description="the kind of error")
    param: str | None = Field(default=None, description="the request field at fault, e.g. `documents.3`")


class PrismError(Exception):
    """An error with its kind; the HTTP layer turns it into STATUS[kind] and an ErrorBody."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.kind, self.message, self.param, self.headers = kind, message, param, headers or {}

    def __reduce__(self):
        """Picklable with its kind, so one raised in a replica reaches the router whole (Ray pickles it)."""
        return type(self), (self.kind, self.message, self.param, self.headers)

    @property
    def status(self) -> int:
        return STATUS[self.kind]

    def body(self) -> dict:
        return ErrorBody(message=self.message, type=self.kind, param=self.param).model_dump(mode="json")


def retry_later(kind: ErrorKind, message: str, retry_after_s: int) -> PrismError:
    return PrismError(kind, message, headers={"Retry-After": str(retry_after_s)})
