"""Batches for the scorer tier, gathered across concurrent requests, the least served first.

`@serve.batch` serves its queue first come, first served: a request of 64 long chunks queues 64 items, and
a one-document request that arrives a moment later waits behind all of them. `FairBatcher` keeps one queue
per request and fills each batch from the request that has been served the fewest tokens so far, then
the next (least attained service: a small request, served little, is in the next batch and usually whole
in it, whatever a large one queued before it; the large one runs on what the small ones leave). A request
passed over for `max_passed_over` batches in a row is overdue, and one batch in every `max_passed_over + 1`
is an overdue turn: the longest passed over goes first in it. None starves (each overdue request gets a
turn, the longest waiting first), and however many large requests wait, together they lead at most one
batch in `max_passed_over + 1` while small ones are waiting: a turn per request instead would let three
overdue large requests lead three batches in a row, then again. Items of a request whose caller left
(deadline, disconnect) are dropped before they are computed.

An item too long for one batch (a document of `max_length` tokens) is computed a piece per batch: the
runner answers `Again(rest)` for it, and the rest goes back to the front of its request's queue, so other
requests' items run between its pieces. What is held between pieces (the row's state so far) is bounded:
at most `max_continuing` items are under way at once, and one that would start another waits.

Pure asyncio: tested without Ray (tests/test_fair_batch.py).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

MAX_PASSED_OVER = 8  # batches a waiting request may be passed over in a row before it is overdue (the scorer
# takes `scorer.max_passed_over` from its config)


@dataclass(frozen=True)
class Again:
    """What `run_batch` answers for an item it has not finished: `item` is what is left of it."""

    item: object


@dataclass
class _Entry:
    item: object
    future: asyncio.Future
    continued: bool = False  # a rest handed back by `Again`: it counts against `max_continuing`


@dataclass
class _Request:
    """One `submit` call's entries still to compute, and what it has been served."""

    key: int  # arrival order
    entries: deque = field(default_factory=deque)
    served: int = 0  # tokens of its items taken into batches so far
    passed: int = 0  # batches in a row taken without any of its items while it waited


class FairBatcher:
    """`await submit(items)` answers each item's result, in order. `run_batch(items)` computes one batch
    (a list of results or `Again`s, one per item) and runs one at a time; a batch holds at most `max_tokens`
    tokens by `tokens_of` (one item always fits). The first item to wait starts a `wait_s` window for
    others to join, cut short when what waits fills a batch. `may_continue(item)` says whether a fresh item
    may answer `Again` (such an item starts only while fewer than `max_continuing` are under way)."""

    def __init__(self, run_batch: Callable[[list], Awaitable[list]], max_tokens: int, wait_s: float,
                 tokens_of: Callable[[object], int], may_continue: Callable[[object], bool] = lambda item: False,
                 max_continuing: int = 1, max_passed_over: int = MAX_PASSED_OVER):
        if max_continuing < 1 or max_passed_over < 1:
            raise ValueError("max_continuing and max_passed_over must be >= 1")
        self._run, self.max_tokens, self.wait_s, self._tokens_of = run_batch, max_tokens, wait_s, tokens_of
        self._may_continue, self.max_continuing, self.max_passed_over = may_continue, max_continuing, max_passed_over
        self._waiting: dict[int, _Request] = {}  # requests with entries to compute, by key
        self._under_way = 0  # items that answered Again and have not finished
        self._since_turn = 0  # batches since one was led by an overdue request
        self._ids = itertools.count()
        self._arrived = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    async def submit(self, items: list) -> list:
        if not items:
            return []
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done():
            self._arrived = asyncio.Event()  # of this loop (a batcher may outlive one, as in a test's asyncio.run)
            self._loop_task = loop.create_task(self._serve())
        futures = [loop.create_future() for _ in items]
        key = next(self._ids)
        self._waiting[key] = _Request(key, deque(_Entry(item, f) for item, f in zip(items, futures)))
        self._arrived.set()
        # A cancelled caller cancels its futures (gather does), and `take` drops cancelled ones.
        return await asyncio.gather(*futures)

    @property
    def under_way(self) -> int:
        return self._under_way

    def take(self) -> list[tuple[_Request, _Entry]]:
        """The next batch as (request, entry) pairs, within the budget: the requests' items in the order of
        `_priority`. An item that may not start yet (too many under way) keeps its place while its
        request's next goes."""
        for req in list(self._waiting.values()):
            if any(e.future.done() for e in req.entries):  # its caller left
                for e in req.entries:
                    if e.future.done():
                        self._finish(e)
                req.entries = deque(e for e in req.entries if not e.future.done())
            if not req.entries:
                del self._waiting[req.key]
        turn = self._since_turn >= self.max_passed_over  # this batch may be an overdue turn
        order = sorted(self._waiting.values(), key=lambda req: self._priority(req, turn))
        batch, tokens, starting = [], 0, 0
        for req in order:
            while req.entries:
                full = self._under_way + starting >= self.max_continuing
                at = next((i for i, e in enumerate(req.entries) if not (full and self._starts(e))), None)
                if at is None:
                    break
                entry = req.entries[at]
                cost = self._tokens_of(entry.item)
                if batch and tokens + cost > self.max_tokens:
                    break
                del req.entries[at]
                batch.append((req, entry))
                tokens += cost
                starting += self._starts(entry)
                req.served += cost
            if batch and tokens >= self.max_tokens:
                break
        led_by_overdue = turn and bool(batch) and batch[0][0].passed >= self.max_passed_over
        self._since_turn = 0 if led_by_overdue else self._since_turn + 1
        taken = {req.key for req, _ in batch}
        for req in list(self._waiting.values()):
            req.passed = 0 if req.key in taken else req.passed + 1
            if not req.entries:
                del self._waiting[req.key]
        return batch

    def _priority(self, req: _Request, turn: bool) -> tuple:
        """In an overdue turn, overdue requests first, the longest passed over first; then the least served;
        then the oldest."""
        overdue = turn and req.passed >= self.max_passed_over
        return (not overdue, -req.passed if overdue else req.served, req.key)

    def _starts(self, entry: _Entry) -> bool:
        """Whether taking the entry may put one more item under way."""
        return not entry.continued and self._may_continue(entry.item)

    def _finish(self, entry: _Entry) -> None:
        if entry.continued:
            self._under_way -= 1

    def _again(self, req: _Request, entry: _Entry, rest: object) -> None:
        """The rest of an item goes back to the front of its request's queue."""
        if not entry.continued:
            self._under_way += 1
        req.entries.appendleft(_Entry(rest, entry.future, continued=True))
        self._waiting.setdefault(req.key, req)

    def _queued_tokens_at_least(self, n: int) -> bool:
        total = 0
        for req in self._waiting.values():
            for entry in req.entries:
                if not entry.future.done():
                    total += self._tokens_of(entry.item)
                    if total >= n:
                        return True
        return False

    async def _serve(self) -> None:
        while True:
            if not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = asyncio.get_running_loop().time() + self.wait_s
            while self.wait_s > 0 and not self._queued_tokens_at_least(self.max_tokens):
                self._arrived.clear()
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._arrived.wait()
                except TimeoutError:
                    break
            batch = self.take()
            if not batch:
                continue
            try:
                results = await self._run([entry.item for _, entry in batch])
            except Exception as exc:  # the batch's callers get the error; the loop goes on
                for _, entry in batch:
                    self._finish(entry)
                    if not entry.future.done():
                        entry.future.set_exception(exc)
                continue
            for (req, entry), result in zip(batch, results):
                if isinstance(result, Again) and not entry.future.done():
                    self._again(req, entry, result.item)
                    continue
                self._finish(entry)
                if not entry.future.done():
                    entry.future.set_result(result)
