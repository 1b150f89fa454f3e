"""Ranking and the choice of evidence targets: one definition for the service, the CLI and batch jobs."""

from __future__ import annotations

from collections.abc import Sequence


def best_first(scores: Sequence[float | None]) -> list[int]:
    """Indices of the scored items, best first; ties keep input order; unscored (None) items are left out."""
    return sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: -scores[i])


def ranks(scores: Sequence[float | None]) -> list[int | None]:
    """Per item its rank, 1 = best (as `best_first` orders them); unscored items get None."""
    out: list[int | None] = [None] * len(scores)
    for r, i in enumerate(best_first(scores), 1):
        out[i] = r
    return out


def wants_evidence(rank: int | None, score: float | None, top_n: int, min_score: float | None = None) -> bool:
    """Whether a ranked document gets contribution/evidence: among the top `top_n`, and scoring at least
    `min_score` when one is given."""
    return (rank is not None and score is not None and rank <= top_n
            and (min_score is None or score >= min_score))
