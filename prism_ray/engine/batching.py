"""Token-budget batching: batch sizes follow tokens, not pair counts."""

from __future__ import annotations

from collections.abc import Sequence


def budget_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Group indices into batches sorted by length, each padded batch within `token_budget` tokens.

    A batch costs `len(batch) * longest` tokens once right-padded; sorting by length keeps padding
    small. A single row longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # ascending order: the newcomer is the longest so far
        too_many = max_batch_size is not None and len(current) >= max_batch_size
        if current and ((len(current) + 1) * longest > token_budget or too_many):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def packed_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Group indices, in order, into batches of at most `token_budget` tokens in all (packed rows: a batch
    costs the sum of its rows, not rows x the longest) and at most `max_batch_size` rows. A single row longer
    than the budget still gets a batch of its own."""
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, n in enumerate(lengths):
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (total + n > token_budget or full):
            batches.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        batches.append(current)
    return batches
