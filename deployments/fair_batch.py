"""Batches for the scorer tier, gathered across concurrent requests and taken from them in turn.

`@serve.batch` serves its queue first come, first served: a request of 64 long chunks queues 64 items, and
a one-document request that arrives a moment later waits behind all of them. `FairBatcher` keeps one queue
per request and fills each batch round-robin over the waiting requests (one item from each, then a second
from each, ...) up to the token budget, so a small request is in the next batch whatever a large one
queued before it. Items of a request whose caller left (deadline, disconnect) are dropped before they
are computed. Pure asyncio: tested without Ray (tests/test_fair_batch.py).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable


class FairBatcher:
    """`await submit(items)` answers each item's result, in order. `run_batch(items)` computes one batch
    (a list of results, one per item) and runs one at a time; a batch holds at most `max_tokens`
    tokens by `tokens_of` (one item always fits). The first item to wait starts a `wait_s` window for
    others to join, cut short when what waits fills a batch."""

    def __init__(self, run_batch: Callable[[list], Awaitable[list]], max_tokens: int, wait_s: float,
                 tokens_of: Callable[[object], int]):
        self._run, self.max_tokens, self.wait_s, self._tokens_of = run_batch, max_tokens, wait_s, tokens_of
        self._waiting: OrderedDict[int, deque] = OrderedDict()  # request -> its (item, future) pairs
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
        self._waiting[next(self._ids)] = deque(zip(items, futures))
        self._arrived.set()
        # A cancelled caller cancels its futures (gather does), and `_take` drops cancelled ones.
        return await asyncio.gather(*futures)

    def take(self) -> list[tuple[object, asyncio.Future]]:
        """The next batch: round-robin over the waiting requests, oldest first, within the budget."""
        batch, tokens = [], 0
        while self._waiting:
            key, queue = next(iter(self._waiting.items()))
            while queue and queue[0][1].done():  # its caller left
                queue.popleft()
            if not queue:
                del self._waiting[key]
                continue
            cost = self._tokens_of(queue[0][0])
            if batch and tokens + cost > self.max_tokens:
                break
            batch.append(queue.popleft())
            tokens += cost
            self._waiting.move_to_end(key)  # the next item comes from the next request
            if not queue:
                del self._waiting[key]
        return batch

    def _queued_tokens_at_least(self, n: int) -> bool:
        total = 0
        for queue in self._waiting.values():
            for item, future in queue:
                if not future.done():
                    total += self._tokens_of(item)
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
                results = await self._run([item for item, _ in batch])
            except Exception as exc:  # the batch's callers get the error; the loop goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
