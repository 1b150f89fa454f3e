"""What the engines answer, and what a tier answers: frozen records, free of torch, that cross Serve handles
and Ray Data actors as they are (the router imports this without loading torch).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScoreResult:
    score: float  # sigmoid(logit)
    logit: float  # l_yes - l_no
    num_tokens: int  # whole prompt, after truncation
    truncated: bool  # the document was cut to fit max_length


@dataclass(frozen=True)
class EvidenceResult:
    score: float
    logit: float
    relevant: bool  # the first generated token is "yes"
    contribution: str | None
    evidence: str | None
    text: str  # everything generated, special tokens removed
    truncated: bool  # generation was cut by max_new_tokens before the end of turn
    num_tokens: int  # prompt tokens
    prompt_truncated: bool  # the document was cut to fit max_length
    generated_tokens: int


@dataclass(frozen=True)
class Timing:
    """Where a tier call's time went (the router reports it as `Server-Timing: scorer;dur=`)."""

    compute_ms: float  # tokenizing the request + the engine call(s) that computed it


@dataclass(frozen=True)
class ScoreReply:
    """The scorer tier's answer for one (query, documents) group."""

    results: list[ScoreResult]  # one per document, in order
    timing: Timing
