"""Long documents read whole: cut into chunks of text, each scored as a document of its own.

A document that fits the model's room (max_length minus the prompt, or `max_tokens_per_doc`) stays
one chunk, the whole text: it is scored exactly as without chunking. A longer one is cut at
whitespace, never inside a word; text without spaces (Chinese, Japanese, Korean) is cut between
characters. Each chunk's text is tokenized on its own and holds at most `chunk_tokens` tokens
(a single word longer than that is one chunk, cut by the scorer like any long document), and
consecutive chunks share about `overlap_tokens` tokens so that a sentence on a boundary is read
whole by one of them. At most `max_chunks` chunks, in document order; a document that needs more
loses its remainder and says so (`truncated`).

Chunks are character spans of the original text: `document[start:end]` is exactly the text scored,
so scoring that slice alone as a document gives the chunk's score.

A long document is read only as far as its chunks reach: it is chunked from a cut that holds
`max_chunks` x `chunk_tokens` tokens and a margin, and the cut doubles until its chunks end clear of
it (the chunks are then those of the whole text), so a 15 MB document costs what its chunks read.
"""

from __future__ import annotations

import bisect
import re
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prism_ray.prompt import CUT_MARGIN_TOKENS
from prism_ray.results import ScoreResult

# A unit the cutter never splits: one CJK character, or a run of other non-space characters.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\uff66-\uff9f"
_UNIT = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")

DEFAULT_OVERLAP_TOKENS = 32


@dataclass(frozen=True)
class Chunk:
    start: int  # character offsets in the original document
    end: int


@dataclass(frozen=True)
class ChunkedDocument:
    chunks: list[Chunk]
    truncated: bool  # more than max_chunks chunks were needed; the rest of the text is not scored


def split(text: str, chunk_tokens: int, overlap_tokens: int, max_chunks: int,
          token_starts: Callable[[str], list[int]], count_tokens: Callable[[str], int]) -> ChunkedDocument:
    """Chunks of `text`. `token_starts(text)`: the character offset where each of its tokens starts
    (used to place cuts); `count_tokens(s)`: tokens of `s` tokenized on its own (each cut is checked
    with it, since tokens at a cut can merge differently than inside the whole text)."""
    if chunk_tokens < 1 or max_chunks < 1 or overlap_tokens < 0:
        raise ValueError("chunk_tokens and max_chunks must be >= 1, overlap_tokens >= 0")
    starts = token_starts(text)
    if len(starts) <= chunk_tokens and count_tokens(text) <= chunk_tokens:
        return ChunkedDocument([Chunk(0, len(text))], False)
    # Units as two arrays of offsets (8 bytes each, not a tuple of two ints): a long document has 100,000s.
    unit_start, unit_end = array("q"), array("q")
    for m in _UNIT.finditer(text):
        unit_start.append(m.start())
        unit_end.append(m.end())
    n_units = len(unit_start)

    def tokens_between(a: int, b: int) -> int:  # estimate: tokens of the whole text starting in [a, b)
        return bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)

    overlap_tokens = min(overlap_tokens, chunk_tokens // 2)
    chunks: list[Chunk] = []
    i = 0
    while i < n_units and len(chunks) < max_chunks:
        first = unit_start[i]
        # The furthest unit end j such that units[i:j] fit, by the estimate; then checked exactly.
        lo, hi = i + 1, n_units
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tokens_between(first, unit_end[mid - 1]) <= chunk_tokens:
                lo = mid
            else:
                hi = mid - 1
        j = lo
        while j > i + 1 and count_tokens(text[first:unit_end[j - 1]]) > chunk_tokens:
            j -= 1
        chunks.append(Chunk(first, unit_end[j - 1]))
        if j >= n_units:
            return ChunkedDocument(chunks, False)
        # The next chunk starts far enough back to share about overlap_tokens tokens, and always moves on.
        k = j
        while k - 1 > i and tokens_between(unit_start[k - 1], unit_end[j - 1]) <= overlap_tokens:
            k -= 1
        i = k
    return ChunkedDocument(chunks, i < n_units)


def chunk_documents(prompts, query: str, documents: list[str], max_chunks_per_doc: int, chunk_tokens: int | None = None,
                    overlap_tokens: int | None = None, max_doc_tokens: int | None = None) -> list[ChunkedDocument]:
    """Chunks of each document for one query under a `PrismPromptTokenizer`: `chunk_tokens` defaults to,
    and is capped at, what fits `max_length` with this query's prompt (and `max_doc_tokens`)."""
    return list(iter_chunk_documents(prompts, query, documents, max_chunks_per_doc, chunk_tokens, overlap_tokens,
                                     max_doc_tokens))


def chunk_size(prompts, query: str, chunk_tokens: int | None = None, max_doc_tokens: int | None = None) -> int:
    """Tokens a chunk holds at most for this query: `chunk_tokens`, capped at (and by default) the room a
    document has under `max_length` with the query's prompt (and `max_doc_tokens`)."""
    room = prompts.document_room(prompts.prefix(query), max_doc_tokens)
    return min(chunk_tokens or room, room)


def iter_chunk_documents(prompts, query: str, documents: list[str], max_chunks_per_doc: int,
                         chunk_tokens: int | None = None, overlap_tokens: int | None = None,
                         max_doc_tokens: int | None = None,
                         max_chunks_in_all: int | None = None) -> Iterator[ChunkedDocument]:
    """`chunk_documents`, one document at a time: a caller with a limit on all chunks stops reading there.
    With `max_chunks_in_all`, a document is read only as far as one chunk past what the limit leaves, so
    the document that passes it comes back with more chunks than are left (the caller refuses it) without
    the rest of its text being read; documents within the limit are chunked exactly as without it."""
    size = chunk_size(prompts, query, chunk_tokens, max_doc_tokens)
    overlap = DEFAULT_OVERLAP_TOKENS if overlap_tokens is None else overlap_tokens
    left = max_chunks_in_all
    for doc in documents:
        most = max_chunks_per_doc if left is None else min(max_chunks_per_doc, left + 1)
        out = _split_read_as_needed(prompts, doc, size, overlap, most)
        if left is not None:
            left -= len(out.chunks)
        yield out


def _split_read_as_needed(prompts, doc: str, size: int, overlap: int, max_chunks: int) -> ChunkedDocument:
    """`split(doc, ...)`, reading only as much of `doc` as its chunks reach (see the module's docstring)."""
    def count_tokens(s: str) -> int:  # enough to tell whether s is over size, without tokenizing all of it
        return len(prompts.document(s, size + 1))

    need = max_chunks * size + 1
    while True:
        text, starts = prompts.document_head_starts(doc, need)
        out = split(text, size, overlap, max_chunks, lambda _, s=starts: s, count_tokens)
        if len(text) == len(doc) or _clear_of_cut(text, starts, out):
            return out
        need *= 2


def _clear_of_cut(text: str, starts: Sequence[int], out: ChunkedDocument) -> bool:
    """Whether chunks of a cut `text` are those of the whole document: they stop short of the text's
    end (max_chunks reached), a whole unit lies between the last chunk and the cut, and the cut's last
    CUT_MARGIN_TOKENS tokens (which a cut can change) are past the last chunk."""
    end = out.chunks[-1].end
    after = _UNIT.search(text, end)
    return (out.truncated and after is not None and after.end() < len(text)
            and bisect.bisect_left(starts, end) + CUT_MARGIN_TOKENS <= len(starts))


def best_chunk(scores: list[float]) -> int:
    """The chunk a document is scored by: the highest score, the first on a tie."""
    return max(range(len(scores)), key=lambda k: (scores[k], -k))


def chunk_texts(documents: list[str], chunked: list[ChunkedDocument]) -> list[str]:
    """Every chunk's text, document after document: what one scorer call receives."""
    return [doc[c.start:c.end] for doc, cd in zip(documents, chunked) for c in cd.chunks]


def per_document(chunked: list[ChunkedDocument], results: list) -> list[list]:
    """`results` of `chunk_texts(...)`, cut back into one list per document."""
    out, at = [], 0
    for cd in chunked:
        out.append(results[at:at + len(cd.chunks)])
        at += len(cd.chunks)
    return out


@dataclass(frozen=True)
class Folded:
    """One document's outcome from its chunks' results: the best chunk gives the score."""

    best: ScoreResult  # the best chunk's result
    chunk: dict  # {index, count, start, end}: which chunk, of how many, and its character span
    truncated: bool  # the document needed more chunks than allowed, or a chunk was cut by the scorer
    num_tokens: int  # prompt tokens of all its chunks


def fold(chunked: list[ChunkedDocument], results: list) -> list[Folded]:
    """Per document, its chunks' `ScoreResult`s (`results` of `chunk_texts(...)`) folded: the one definition
    the service, the CLI, the Reranker and the Ray Data actors use."""
    out = []
    for cd, mine in zip(chunked, per_document(chunked, results)):
        k = best_chunk([r.score for r in mine])
        c = cd.chunks[k]
        out.append(Folded(mine[k], {"index": k, "count": len(cd.chunks), "start": c.start, "end": c.end},
                          cd.truncated or any(r.truncated for r in mine), sum(r.num_tokens for r in mine)))
    return out
