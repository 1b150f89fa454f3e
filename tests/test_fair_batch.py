"""The scorer's batcher without Ray: batches within the token budget, the least served request first (none
starved), long items a piece per batch, callers that left dropped, errors to the batch's callers only."""

from __future__ import annotations

import asyncio

import pytest

from deployments.fair_batch import Again, FairBatcher


class Recorder:
    """A batch runner that records each batch's items and answers item * 10, after `delay_s`."""

    def __init__(self, delay_s: float = 0.0, fail_on=None):
        self.batches: list[list] = []
        self.delay_s, self.fail_on = delay_s, fail_on

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"engine failed on {self.fail_on}")
        return [i * 10 for i in items]


def _batcher(runner, max_tokens=100, wait_s=0.0):
    return FairBatcher(runner, max_tokens, wait_s, tokens_of=lambda item: item % 1000)


def test_results_come_back_in_order_within_the_budget():
    async def main():
        runner = Recorder()
        b = _batcher(runner, max_tokens=100)
        out = await b.submit([30, 40, 50, 60, 500])  # 500: over the budget alone, still a batch of its own
        return runner, out

    runner, out = asyncio.run(main())
    assert out == [300, 400, 500, 600, 5000]
    assert all(sum(i % 1000 for i in batch) <= 100 or len(batch) == 1 for batch in runner.batches)
    assert [i for batch in runner.batches for i in batch] == [30, 40, 50, 60, 500]


def test_a_small_request_is_in_the_next_batch_whatever_a_large_one_queued():
    """A request of 20 items arrives first; a one-item request a moment later is served in the second batch,
    not after the large one's 20 items (first come, first served would put it last)."""
    async def main():
        runner = Recorder(delay_s=0.01)
        b = _batcher(runner, max_tokens=100)
        large = asyncio.ensure_future(b.submit([1000 + 50] * 20))  # 20 items of 50 tokens: 10 batches
        await asyncio.sleep(0.005)  # the first batch is computing
        small = await b.submit([7])
        batches_before_small = next(i for i, batch in enumerate(runner.batches) if 7 in batch)
        return batches_before_small, await large, small, runner

    index, large, small, runner = asyncio.run(main())
    assert small == [70] and large == [10500] * 20
    assert index == 1  # the batch after the one computing when it arrived
    assert runner.batches[1] == [7, 1050]  # the least served first, then the budget filled from the next


def test_the_least_served_request_goes_first_and_none_is_passed_over_too_long():
    """A large request that has been served two batches waits behind 12 fresh small requests until it has
    been passed over max_passed_over (3) batches; then the smalls, passed over longer still, go first: the
    longest waiting first once everyone is overdue."""
    async def main():
        runner = Recorder(delay_s=0.005)
        b = FairBatcher(runner, 100, 0.0, tokens_of=lambda item: item % 1000, max_passed_over=3)
        large = asyncio.ensure_future(b.submit([1000 + 100] * 6))  # a batch per item
        while len(runner.batches) < 2:
            await asyncio.sleep(0.001)
        smalls = await asyncio.gather(*(b.submit([100]) for _ in range(12)))
        return await large, smalls, runner

    large, smalls, runner = asyncio.run(main())
    assert large == [11000] * 6 and smalls == [[1000]] * 12
    owners = "".join("L" if batch == [1100] else "s" for batch in runner.batches)
    start = owners.index("s")
    assert owners[start:] == "sssL" + "s" * 9 + "LLL", owners


def test_overdue_large_requests_together_lead_one_batch_in_max_passed_over_plus_one():
    """Three large requests wait beside two clients that send small requests back to back. Once all three
    are overdue they do not lead batches in a row (a turn per request would give them three of every four):
    while small ones wait, at most one batch in max_passed_over + 1 (4) is a large one's, and every large
    request still finishes."""
    async def main():
        runner = Recorder(delay_s=0.002)
        b = FairBatcher(runner, 100, 0.0, tokens_of=lambda item: item % 1000, max_passed_over=3)
        larges = [asyncio.ensure_future(b.submit([1000 + 100] * 5)) for _ in range(3)]  # a batch per item

        async def small_client():
            for _ in range(15):
                assert await b.submit([100]) == [1000]

        await asyncio.gather(small_client(), small_client())
        done = [await f for f in larges]
        return done, "".join("L" if batch == [1100] else "s" for batch in runner.batches)

    larges, owners = asyncio.run(main())
    assert larges == [[11000] * 5] * 3
    while_smalls_wait = owners[:owners.rindex("s") + 1]
    assert "LL" not in while_smalls_wait[3:], owners  # the first batches start the three requests
    windows = [while_smalls_wait[i:i + 4] for i in range(3, len(while_smalls_wait) - 3)]
    assert max(w.count("L") for w in windows) == 1, owners
    assert owners.count("L") == 15 and owners.count("s") == 30


def test_a_caller_that_left_has_its_items_dropped():
    async def main():
        runner = Recorder(delay_s=0.02)
        b = _batcher(runner, max_tokens=50)
        gone = asyncio.ensure_future(b.submit([1050] * 10))
        await asyncio.sleep(0.01)
        gone.cancel()
        stays = await b.submit([5])
        await asyncio.sleep(0.05)
        return runner, stays

    runner, stays = asyncio.run(main())
    assert stays == [50]
    assert sum(batch.count(1050) for batch in runner.batches) <= 2  # at most the batch already computing


def test_a_failed_batch_fails_its_callers_only_and_the_batcher_goes_on():
    async def main():
        runner = Recorder(fail_on=13)
        b = _batcher(runner, max_tokens=10)  # every item a batch of its own
        bad = asyncio.gather(b.submit([13]), return_exceptions=True)
        good = b.submit([4, 5])
        return await bad, await good

    (bad,), good = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and "engine failed on 13" in str(bad)
    assert good == [40, 50]


@pytest.mark.parametrize("wait_s", [0.0, 0.05])
def test_concurrent_requests_gather_into_one_batch(wait_s):
    """Requests that arrive within the wait window share a batch."""
    async def main():
        runner = Recorder()
        b = _batcher(runner, max_tokens=1000, wait_s=wait_s)
        outs = await asyncio.gather(*(b.submit([i, i + 1]) for i in range(0, 8, 2)))
        return runner, outs

    runner, outs = asyncio.run(main())
    assert outs == [[0, 10], [20, 30], [40, 50], [60, 70]]
    if wait_s:
        assert len(runner.batches) == 1


class Pieces:
    """A batch runner for (name, pieces) items: an item of more than one piece answers Again with one piece
    fewer, the last piece answers the name; it records each batch's items."""

    def __init__(self, delay_s: float = 0.01):
        self.batches: list[list] = []
        self.delay_s = delay_s

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay_s)
        return [Again((name, n - 1)) if n > 1 else name for name, n in items]


def _pieces_batcher(runner, max_continuing=1):
    return FairBatcher(runner, max_tokens=10, wait_s=0.0, tokens_of=lambda item: 10,
                       may_continue=lambda item: item[1] > 1, max_continuing=max_continuing)


def test_an_item_answered_again_runs_a_piece_per_batch_with_other_requests_between():
    """A long item of 4 pieces; a small request that arrives during its first piece runs in the next batch,
    not after the last piece."""
    async def main():
        runner = Pieces()
        b = _pieces_batcher(runner)
        long = asyncio.ensure_future(b.submit([("long", 4)]))
        await asyncio.sleep(0.005)
        small = await b.submit([("small", 1)])
        return await long, small, runner, b

    long, small, runner, b = asyncio.run(main())
    assert long == ["long"] and small == ["small"]
    assert runner.batches == [[("long", 4)], [("small", 1)], [("long", 3)], [("long", 2)], [("long", 1)]]
    assert b.under_way == 0


def test_at_most_max_continuing_items_are_under_way_and_the_next_waits():
    """With max_continuing=1 a second long request starts only when the first is done, while short
    items of either request still run between the pieces."""
    async def main():
        runner = Pieces()
        b = _pieces_batcher(runner, max_continuing=1)
        outs = await asyncio.gather(b.submit([("a", 3)]), b.submit([("b", 3), ("b-short", 1)]))
        return outs, runner, b

    outs, runner, b = asyncio.run(main())
    assert outs == [["a"], ["b", "b-short"]]
    order = [item for batch in runner.batches for item in batch]
    assert order.index(("b", 3)) > order.index(("a", 1))  # b started after a was done
    assert order.index(("b-short", 1)) < order.index(("a", 1))  # b's short item did not wait behind it
    assert b.under_way == 0

    async def two():
        runner = Pieces()
        b = _pieces_batcher(runner, max_continuing=2)
        await asyncio.gather(b.submit([("a", 3)]), b.submit([("b", 3)]))
        return runner

    order = [item for batch in asyncio.run(two()).batches for item in batch]
    assert order.index(("b", 3)) < order.index(("a", 1))  # two may be under way at once


def test_a_caller_that_left_part_way_frees_its_place():
    async def main():
        runner = Pieces(delay_s=0.02)
        b = _pieces_batcher(runner, max_continuing=1)
        gone = asyncio.ensure_future(b.submit([("gone", 50)]))
        await asyncio.sleep(0.05)  # a few pieces in
        gone.cancel()
        out = await asyncio.wait_for(b.submit([("next", 2)]), 5)
        return out, runner, b

    out, runner, b = asyncio.run(main())
    assert out == ["next"] and b.under_way == 0
    assert sum(1 for batch in runner.batches for name, _ in batch if name == "gone") < 10
