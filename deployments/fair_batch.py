"""Batches for the scorer tier, gathered across concurrent requests and taken from them in turn.

`@serve.batch` serves its queue first come, first served: a request of 64 long chunks queues 64 items, and
a one-document request that arrives a moment later waits behind all of them. `FairBatcher` keeps one queue
per request and fills each batch round-robin over the waiting requests (one item from each, then a second
from each, ...) up to the token budget, so a small request is in the next batch whatever a large one
queued before it. Items of a request whose caller left (deadline, disconnect) are dropped before they
are computed.

An item too long for one batch (a document of `max_length` tokens) is computed a piece per batch: the
runner answers `Again(rest)` for it, and the rest goes back to the front of its request's queue, so other
requests' items run between its pieces. What is held between pieces (the row's state so far) is bounded:
at most `max_continuing` items are under way at once, and one that would start another waits.

Pure asyncio: tested without Ray (tests/test_fair_batch.py).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Again:
    """What `run_batch` answers for an item it has not finished: `item` is what is left of it."""

    item: object


@dataclass
class _Entry:
    item: object
    future: asyncio.Future
    continued: bool = False  # a rest handed back by `Again`: it counts against `max_continuing`


class FairBatcher:
    """`await submit(items)` answers each item's result, in order. `run_batch(items)` computes one batch
    (a list of results or `Again`s, one per item) and runs one at a time; a batch holds at most `max_tokens`
    tokens by `tokens_of` (one item always fits). The first item to wait starts a `wait_s` window for
    others to join, cut short when what waits fills a batch. `may_continue(item)` says whether a fresh item
    may answer `Again` (such an item starts only while fewer than `max_continuing` are under way)."""

    def __init__(self, run_batch: Callable[[list], Awaitable[list]], max_tokens: int, wait_s: float,
                 tokens_of: Callable[[object], int], may_continue: Callable[[object], bool] = lambda item: False,
                 max_continuing: int = 1):
        self._run, self.max_tokens, self.wait_s, self._tokens_of = run_batch, max_tokens, wait_s, tokens_of
        self._may_continue, self.max_continuing = may_continue, max_continuing
        self._waiting: OrderedDict[int, deque[_Entry]] = OrderedDict()  # request -> its entries
        self._under_way = 0  # items that answered Again and have not finished
        self._ids = itertools.count()
        self._arrived = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    async def submit(self, items: list) -> list:
        if not items:
            return []
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._serve())
        futures = [loop.create_future() for _ in items]
        self._waiting[next(self._ids)] = deque(_Entry(item, f) for item, f in zip(items, futures))
        self._arrived.set()
        # A cancelled caller cancels its futures (gather does), and `take` drops cancelled ones.
        return await asyncio.gather(*futures)

    @property
    def under_way(self) -> int:
        return self._under_way

    def take(self) -> list[tuple[int, _Entry]]:
        """The next batch as (request, entry) pairs: round-robin over the waiting requests, oldest first,
        within the budget. An item that may not start yet (too many under way) keeps its place while the
        request's next item goes; a request with nothing that may start is passed over."""
        batch, tokens, starting, passed = [], 0, 0, set()
        while len(passed) < len(self._waiting):
            key, queue = next(iter(self._waiting.items()))
            if any(e.future.done() for e in queue):  # its caller left
                for e in queue:
                    if e.future.done():
                        self._finish(e)
                queue = self._waiting[key] = deque(e for e in queue if not e.future.done())
            if not queue:
                del self._waiting[key]
                passed.discard(key)
                continue
            full = self._under_way + starting >= self.max_continuing
            at = next((i for i, e in enumerate(queue) if not (full and self._starts(e))), None)
            if at is None:
                passed.add(key)
                self._waiting.move_to_end(key)
                continue
            entry = queue[at]
            cost = self._tokens_of(entry.item)
            if batch and tokens + cost > self.max_tokens:
                break
            del queue[at]
            batch.append((key, entry))
            tokens += cost
            starting += self._starts(entry)
            self._waiting.move_to_end(key)  # the next item comes from the next request
            if not queue:
                del self._waiting[key]
                passed.discard(key)
        return batch

    def _starts(self, entry: _Entry) -> bool:
        """Whether taking the entry may put one more item under way."""
        return not entry.continued and self._may_continue(entry.item)

    def _finish(self, entry: _Entry) -> None:
        if entry.continued:
            self._under_way -= 1

    def _again(self, key: int, entry: _Entry, rest: object) -> None:
        """The rest of an item goes back to the front of its request's queue (a new queue at the back of
        the turn if the request had nothing else waiting)."""
        if not entry.continued:
            self._under_way += 1
        again = _Entry(rest, entry.future, continued=True)
        if key in self._waiting:
            self._waiting[key].appendleft(again)
        else:
            self._waiting[key] = deque([again])

    def _queued_tokens_at_least(self, n: int) -> bool:
        total = 0
        for queue in self._waiting.values():
            for entry in queue:
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
            for (key, entry), result in zip(batch, results):
                if isinstance(result, Again) and not entry.future.done():
                    self._again(key, entry, result.item)
                    continue
                self._finish(entry)
                if not entry.future.done():
                    entry.future.set_result(result)
