"""ScoreEngine: Prism relevance scores with one forward pass per document and a shared prefix.

Per query, the prefix (system prompt + instruction + query, ~200 tokens) runs once (`prefix.PrefixCache`:
the head every query shares once per process, then the query's own tokens; a query with fewer than
`prefix_min_docs` documents in the call leaves its own tokens to its rows, which then continue from the shared
head). The rows of a call, every document of every query, each holding its document + suffix tokens (plus the
prefix tokens past the cached state), then run packed as one token stream without padding, each continuing
from its query's prefix state (`models.base.Model.forward_rows`). A row longer than the
token budget runs its head in pieces first, so no forward holds more than the budget. The final layer runs
only where each row's last token needs it, and only `(w_yes - w_no) · h_last` is computed, never the full
vocabulary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from prism_ray.engine.batching import packed_batches
from prism_ray.engine.loading import LoadedModel, load_model
from prism_ray.engine.models import SequenceState, pack
from prism_ray.prompt import DEFAULT_MAX_LENGTH, EncodedPair
from prism_ray.results import ScoreResult

# Prompt tokens per forward (real tokens: rows are packed, not padded). GPUs want far larger batches.
DEFAULT_TOKEN_BUDGET = {"cpu": 1024, "cuda": 16384}
# Documents a query must have in a call for its prefix (past the shared head) to run as a forward of its own,
# its state then read by every row. With fewer, each row runs those prompt tokens itself, from the shared
# head's state: more tokens computed, one forward fewer. A CPU is bound by computation: always a forward. A GPU
# is bound by the host's launches at these sizes: on the H200 (README) queries of 20 documents scored faster
# with their prefix in the rows, at 1 and at 16 queries a call.
DEFAULT_PREFIX_MIN_DOCS = {"cpu": 1, "cuda": 32}


def validate_group(query, documents) -> None:
    """Raise ValueError naming the field for input no engine call should see."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query must be a non-empty string")
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise ValueError("documents must be a list of strings")
    if len(documents) == 0:
        raise ValueError("documents must hold at least one document")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise ValueError(f"documents[{i}] must be a string, not {type(doc).__name__}")


class ScoreEngine:
    """Scores (query, documents) groups. Construct from a local dir or hub id, or a LoadedModel."""

    def __init__(self, model: str | Path | LoadedModel, dtype: str | torch.dtype = "auto",
                 device: str | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                 token_budget: int | None = None, prefix_min_docs: int | None = None):
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype, device, max_length)
        self.token_budget = token_budget or DEFAULT_TOKEN_BUDGET.get(self.loaded.device.type, 8192)
        self.prefix_min_docs = prefix_min_docs or DEFAULT_PREFIX_MIN_DOCS.get(self.loaded.device.type, 1)

    @property
    def prompts(self):
        return self.loaded.prompts

    def warm_up(self) -> float:
        """Two small scoring calls of different shapes (one row, then three), so that one-time costs (Triton's compile of the Gated
        DeltaNet kernels on a GPU, which made a fresh H200 replica's first request take ~15 s; the compiled
        pointwise chains, which specialise on the first shape and turn dynamic on the second; oneDNN's first
        primitives on a CPU) fall before a replica takes traffic. Returns the seconds they took."""
        return elapsed(lambda: (self.score([("warm-up query", ["a warm-up document"])]),
                                self.score([("a second warm-up query", ["a longer warm-up document than the first"] * 3)])))

    @torch.inference_mode()
    def score(self, groups: Sequence[tuple[str, Sequence[str]]],
              max_doc_tokens: int | None = None) -> list[list[ScoreResult]]:
        """One list of results per (query, documents) group, in the documents' order.

        Documents are cut to fit `max_length` with the prompt, and to `max_doc_tokens` if given. Rows of
        all groups are packed into forward passes together (see `score_encoded_groups`).
        """
        for query, docs in groups:
            validate_group(query, docs)
        prompts = self.loaded.prompts
        encoded = []
        for query, docs in groups:
            prefix = prompts.prefix(query)
            encoded.append((prefix, prompts.encode_documents(query, list(docs), prefix=prefix,
                                                             max_doc_tokens=max_doc_tokens)))
        return self.score_encoded_groups(encoded)

    def score_pairs(self, query: str, documents: Sequence[str]) -> list[ScoreResult]:
        return self.score([(query, documents)])[0]

    def row_tokens(self, prefix: list[int], entry: EncodedPair | Partial) -> int:
        """At most how many tokens a forward computes for this pair of the query whose prompt head is `prefix`:
        its prompt less what its row reads from a cached state. That is the shared system prompt and
        instruction (cut to the family's chunk alignment, computed once per process: 128 tokens on Qwen3.5);
        where each call runs a query's prefix once (`prefix_min_docs` 1, the CPU default), that prefix (cut
        alike); for a `Partial`, its own state. A caller that sizes batches by the engine's work counts this:
        by prompt tokens, a batch of short documents is mostly the shared head and holds a fraction of the
        rows one forward could take."""
        if isinstance(entry, Partial):
            return entry.remaining
        cache = self.loaded.prefixes
        shared = cache.head_length(prefix)
        if self.prefix_min_docs <= 1:  # every call runs each query's prefix once; its rows continue from there
            shared = max(shared, cache.cached_length(len(prefix)))
        return entry.num_tokens - shared

    @torch.inference_mode()
    def score_encoded_groups(self, groups: Sequence[tuple[list[int], Sequence[EncodedPair]]]) -> list[list[ScoreResult]]:
        """Scores already-encoded pairs of several queries, one result list per (prefix, pairs) group.

        For callers that tokenize anyway, such as a Serve replica sizing its batches by tokens. Groups may
        share a prefix (two requests of one query): each distinct prefix runs once (all of them in one
        forward), the one place prefixes are grouped; then the rows of every group are packed
        into forward passes of up to `token_budget` tokens, whatever query they belong to, each row reading
        its own query's prefix state, so many small requests fill a forward as one large one would.
        """
        return self._score(groups, one_piece=False)

    @torch.inference_mode()
    def score_step(self, groups: Sequence[tuple[list[int], Sequence[EncodedPair | Partial]]]) -> list[list[ScoreResult | Partial]]:
        """`score_encoded_groups` that runs at most one piece of each row longer than `token_budget`: such a
        row comes back as a `Partial` (its state so far), to be given back in its pair's place in a later
        call, which goes on from there. Every other row is scored. A caller that interleaves other work
        between the calls (the scorer tier's batcher) so never makes a small request wait out a long
        row's whole prefill, only one piece of it. The scores are those of `score_encoded_groups`."""
        return self._score(groups, one_piece=True)

    def _score(self, groups, one_piece: bool) -> list[list]:
        fresh: dict[tuple[int, ...], int] = {}  # each distinct prefix: its pairs that start here
        for prefix, pairs in groups:
            n = sum(not isinstance(p, Partial) for p in pairs)
            if n:
                fresh[tuple(prefix)] = fresh.get(tuple(prefix), 0) + n
        unique = {prefix: k for k, prefix in enumerate(fresh)}
        run = [n >= self.prefix_min_docs for n in fresh.values()]
        states = list(self.loaded.prefixes.states([list(p) for p in unique], run))
        shared = len(states)  # the query prefixes' states; those of partial rows come after them
        rows: list[tuple[int, int, int, list[int]]] = []  # (group, pair, state, tail)
        for g, (prefix, pairs) in enumerate(groups):
            for i, p in enumerate(pairs):
                if isinstance(p, Partial):
                    states.append(p.state)
                    rows.append((g, i, len(states) - 1, p.pair.ids[p.state.length:]))
                else:
                    s = unique[tuple(prefix)]
                    start = states[s].length if states[s] is not None else 0
                    rows.append((g, i, s, p.ids[start:]))
        results: list[list] = [[None] * len(pairs) for _, pairs in groups]
        moved = self._long_rows_in_pieces(states, rows, shared, rounds=1 if one_piece else None)
        if one_piece:
            for k in moved:
                g, i, s, _ = rows[k]
                results[g][i] = Partial(_pair(groups[g][1][i]), states[s])
        scored = [k for k in range(len(rows)) if results[rows[k][0]][rows[k][1]] is None]
        # The logits stay on the device until every batch is queued: one transfer per call, so on a GPU the
        # host builds batch k+1 while batch k runs instead of waiting for it.
        order, values = [], []
        for batch in packed_batches([len(rows[k][3]) for k in scored], self.token_budget):
            chosen = [rows[scored[b]] for b in batch]
            order.extend(chosen)
            values.append(self._forward_rows(states, chosen))
        if values:
            for (g, i, _, _), value in zip(order, torch.cat(values).tolist()):
                results[g][i] = _result(_pair(groups[g][1][i]), value)
        return results

    def _long_rows_in_pieces(self, states: list[SequenceState | None], rows: list[tuple[int, int, int, list[int]]],
                             shared: int, rounds: int | None = None) -> set[int]:
        """Rows longer than `token_budget` first run their head in pieces of at most the budget, each
        continuing from the state the last one left (as a query continues from its prefix), until what is
        left fits (or for `rounds` pieces at most): no forward pass holds more than the budget, so a
        replica's working set (activations, a piece's attention scores against its context) is bounded by
        the budget, not by `max_length`. Each piece ends at a multiple of the family's `chunk_align` from the
        sequence's start, where a cached state continues exactly as one pass would (see `prefix`). Pieces
        of several long rows pack together. Updates `states` (appending the pieces' own; `states[:shared]`
        are read by other rows and kept) and `rows` in place, each long one now reading its last piece's
        state and holding only the tokens after it; returns the indices of the rows that ran a piece."""
        align, budget, net = self.loaded.net.family.chunk_align, self.token_budget, self.loaded.net
        moved: set[int] = set()
        while rounds is None or rounds > 0:
            pieces = []
            for k, (_, _, s, tail) in enumerate(rows):
                if len(tail) > budget:
                    start = states[s].length if states[s] is not None else 0
                    n = (start + budget) // align * align - start
                    if n > 0:
                        pieces.append((k, n))
            if not pieces:
                break
            for batch in packed_batches([n for _, n in pieces], budget):
                chosen = [pieces[b] for b in batch]
                _, new = net.forward_rows(*pack([rows[k][3][:n] for k, n in chosen],
                                                [states[rows[k][2]] for k, _ in chosen], self.loaded.device),
                                          keep_states=True)
                for (k, n), state in zip(chosen, new):
                    g, i, s, tail = rows[k]
                    if s >= shared:
                        states[s] = None  # the row's previous piece: read by nothing else
                    states.append(state)
                    rows[k] = (g, i, len(states) - 1, tail[n:])
                    moved.add(k)
            if rounds is not None:
                rounds -= 1
        return moved

    def _forward_rows(self, states: list[SequenceState | None], rows: list[tuple[int, int, int, list[int]]]) -> torch.Tensor:
        """Logit differences (on the device, float32) for document+suffix rows, each continuing from its
        query's prefix state."""
        hidden, _ = self.loaded.net.forward_rows(*pack([r[3] for r in rows], [states[r[2]] for r in rows], self.loaded.device))
        return self.loaded.net.scores(hidden)


@dataclass(frozen=True)
class Partial:
    """A pair part-way through its prefill (`ScoreEngine.score_step`): `state` covers the first
    `state.length` of its prompt tokens."""

    pair: EncodedPair
    state: SequenceState

    @property
    def remaining(self) -> int:
        """Prompt tokens still to run."""
        return self.pair.num_tokens - self.state.length


def _pair(entry: EncodedPair | Partial) -> EncodedPair:
    return entry.pair if isinstance(entry, Partial) else entry


def elapsed(call) -> float:
    """Seconds `call()` took."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _result(pair: EncodedPair, logit: float) -> ScoreResult:
    return ScoreResult(score=sigmoid(logit), logit=logit, num_tokens=pair.num_tokens, truncated=pair.truncated)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
