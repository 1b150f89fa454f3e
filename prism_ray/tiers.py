"""How the service calls the tiers: the callables `RerankService` is given, as Protocols.

The scorer answers a `ScoreReply` per (query, documents) group: the engine's own `ScoreResult`s, in the
documents' order, and the `Timing` of the call. The evidence tier answers the engine's `EvidenceResult`
(streamed: text pieces, then that result). The records are `prism_ray.results`; they cross Serve handles
as they are, and nothing between the engines and `prism_ray.api` turns a result into a dict. The router
passes handle calls, tests pass plain async functions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from prism_ray.results import EvidenceResult, ScoreReply


class ScoreCall(Protocol):
    async def __call__(self, model: str, query: str, documents: list[str],
                       max_doc_tokens: int | None) -> ScoreReply: ...


class ScoreGroupsCall(Protocol):
    """Several (query, documents, max_doc_tokens) groups that reach one engine call; a reply per group."""

    async def __call__(self, model: str, groups: list[tuple[str, list[str], int | None]]) -> list[ScoreReply]: ...


class EvidenceCall(Protocol):
    async def __call__(self, model: str, query: str, document: str, max_new_tokens: int) -> EvidenceResult: ...


class EvidenceStreamCall(Protocol):
    """EvidenceCall as it is written: the text new since the last piece (str) at each host sync of the
    decode, then the EvidenceResult."""

    def __call__(self, model: str, query: str, document: str,
                 max_new_tokens: int) -> AsyncIterator[str | EvidenceResult]: ...
