"""The event sequence of a streamed rerank answer (Server-Sent Events; the router writes them).

    scores                      every score, ranked, no evidence yet (the reply body's shape)
    evidence_delta *            per target, its text as it is written: `index` and the `text` new since the
                                last one (when the evidence tier streams)
    evidence | error            per target as it finishes: its Prism fields, or the error of that index
    done                        `evidence_documents` written and `failed`

Targets finish in any order. At the deadline the generations still running are cancelled and each gets an
`error` event of type `timeout`, in rank order; the stream still ends with `done`. A reader that leaves
mid-stream cancels every generation left.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from prism_ray.api import RankedDocument
from prism_ray.errors import ErrorKind, PrismError
from prism_ray.results import EvidenceResult

Pieces = Callable[[RankedDocument], AsyncIterator[str | EvidenceResult]]


async def events(scores: dict | list, targets: list[RankedDocument], pieces: Pieces, deadline: float | None,
                 timeout_error: Callable[[str], PrismError]) -> AsyncIterator[tuple[str, dict | list]]:
    """(event, data) pairs: `scores` first, then each target's events, then `done`. `pieces(r)` yields a
    target's text pieces (str), then its EvidenceResult; `deadline` is event-loop time (None: none);
    `timeout_error(what)` is the error a target still running at the deadline gets."""
    yield "scores", scores
    queue: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()
    tasks = [asyncio.ensure_future(_target_events(r, pieces, queue)) for r in targets]
    open_targets = {r.index for r in targets}
    failed = 0
    loop = asyncio.get_running_loop()
    try:
        while open_targets:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                event, data = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                break
            if event != "evidence_delta":
                open_targets.discard(data["index"])
                failed += event == "error"
            yield event, data
        for r in (r for r in targets if r.index in open_targets):  # past the deadline, in rank order
            failed += 1
            yield "error", {"index": r.index, **timeout_error("evidence for this document").body()}
    finally:  # past the deadline, or a reader that left mid-stream: no generation is left behind
        for t in tasks:
            t.cancel()
    yield "done", {"evidence_documents": len(targets) - failed, "failed": failed}


async def _target_events(r: RankedDocument, pieces: Pieces, queue: asyncio.Queue) -> None:
    """One target's events into `queue`: its deltas, then `evidence` or `error`."""
    try:
        out = None
        async for piece in pieces(r):
            if isinstance(piece, str):
                if piece:
                    queue.put_nowait(("evidence_delta", {"index": r.index, "text": piece}))
            else:
                out = piece
        if out is None:
            raise PrismError(ErrorKind.INTERNAL, "the evidence stream ended without its result")
        r.add_evidence(out)
        queue.put_nowait(("evidence", {"index": r.index, **r.prism_fields()}))
    except Exception as exc:  # noqa: BLE001 - one document's failure must not cut the stream
        queue.put_nowait(("error", {"index": r.index, **_error_body(exc)}))


def _error_body(exc: Exception) -> dict:
    if isinstance(exc, PrismError):
        return exc.body()
    return {"message": f"evidence generation failed: {type(exc).__name__}", "type": ErrorKind.INTERNAL.value,
            "param": None}
