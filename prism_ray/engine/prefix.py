"""Prefix states: what a query's prompt head leaves for its documents, computed once per query.

Every Prism prompt starts with the same system prompt and instruction (~187 tokens), then the query. The
state after the shared head is computed once per process (`PrefixCache.head`); each query's prefix then runs
only its own tokens from there, all queries of a call packed into one forward. A cached state ends at a
multiple of the family's `chunk_align` (64 on Qwen3.5, whose linear attention scans in 64-token chunks from a
sequence's start: a state cached mid-chunk would chunk the rest differently from one full pass and drift by
~1e-5 in score), and at least one prompt token is always left for the rows, so each has a last position.

The last few query prefixes' states are kept (`RECENT_PREFIXES`): the scorer tier computes one request in
several engine calls (its batches are bounded), and each call would otherwise run the query's own tokens again
(64 tokens from the head: 73 ms on the `bench` preset, 0.49 s on `0.8b`, fp32, 2 CPU threads). States are only
read, never written, by the rows that continue from them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from prism_ray.engine.models import Model, SequenceState, pack
from prism_ray.prompt import PrismPromptTokenizer

# Two queries that share nothing: their prefixes agree exactly on the prompt's shared head.
_PROBES = ("a", "水 1")
RECENT_PREFIXES = 4  # query prefix states kept between calls (0.8b, fp32: 24 MiB each; bench preset 4 MiB)


class PrefixCache:
    """The shared head's state (once per process), and query prefixes' states (the last few kept)."""

    def __init__(self, net: Model | None, prompts: PrismPromptTokenizer, keep: int = RECENT_PREFIXES):
        self.net, self.prompts, self.keep = net, prompts, keep
        self._head: tuple[list[int], SequenceState | None] | None = None
        self._recent: OrderedDict[tuple[int, ...], SequenceState] = OrderedDict()  # cached tokens -> state
        self._lock = threading.Lock()

    def cached_length(self, prefix_len: int) -> int:
        align = self.net.family.chunk_align
        return min((prefix_len // align) * align, prefix_len - 1)

    def head(self) -> tuple[list[int], SequenceState | None]:
        """The shared head's tokens (cut to `chunk_align`) and its state (None when empty)."""
        with self._lock:
            if self._head is None:
                a, b = (self.prompts.prefix(q) for q in _PROBES)
                common = 0
                while common < min(len(a), len(b)) and a[common] == b[common]:
                    common += 1
                align = self.net.family.chunk_align
                ids = a[: (common // align) * align]
                state = None
                if ids:
                    _, (state,) = self.net.forward_rows(*pack([ids], [None], self.net.device), keep_states=True)
                self._head = (ids, state)
            return self._head

    def head_length(self, prefix: list[int]) -> int:
        """How many of `prefix`'s first tokens each row reads from the shared head's cached state instead of
        computing them (0 for a prefix that does not start with the head)."""
        head_ids, _ = self.head()
        from_head = bool(head_ids) and self.cached_length(len(prefix)) >= len(head_ids) and \
            prefix[: len(head_ids)] == head_ids
        return len(head_ids) if from_head else 0

    def states(self, prefixes: list[list[int]], run: list[bool] | None = None) -> list[SequenceState | None]:
        """The state after `cached_length(len(p))` tokens of each prefix, in order (None where that is no
        token). Prefixes that start with the shared head continue from its state; the others' own tokens run
        packed in one forward. Where `run[i]` is False, prefix i's own tokens are not run here: its state is
        the shared head's (or None), and the rows that continue from it run those tokens themselves."""
        head_ids, head_state = self.head()
        out: list[SequenceState | None] = [None] * len(prefixes)
        todo, tails, contexts = [], [], []
        for i, p in enumerate(prefixes):
            cached = self.cached_length(len(p))
            from_head = bool(head_ids) and cached >= len(head_ids) and p[: len(head_ids)] == head_ids
            start = len(head_ids) if from_head else 0
            if cached == start or (run is not None and not run[i]):
                out[i] = head_state if from_head else None
                continue
            with self._lock:
                kept = self._recent.get(tuple(p[:cached]))
                if kept is not None:
                    self._recent.move_to_end(tuple(p[:cached]))
            if kept is not None:
                out[i] = kept
                continue
            todo.append(i)
            tails.append(p[start:cached])
            contexts.append(head_state if from_head else None)
        if todo:
            _, states = self.net.forward_rows(*pack(tails, contexts, self.net.device), keep_states=True)
            for i, state in zip(todo, states):
                out[i] = state
                self._remember(tuple(prefixes[i][: self.cached_length(len(prefixes[i]))]), state)
        return out  # type: ignore[return-value]

    def _remember(self, key: tuple[int, ...], state: SequenceState) -> None:
        with self._lock:
            self._recent[key] = state
            self._recent.move_to_end(key)
            while len(self._recent) > self.keep:
                self._recent.popitem(last=False)
