"""What a Ray Data actor does with one block of rows: score them (and rank), or generate evidence.

The model work is a backend's (`prism_ray.data.backends`: the engines in the actor, or a running Serve
app's deployments). Everything else (grouping by query, ranks, which documents get evidence, error
rows) is shared by both layouts and by the batch job, whose last stage also writes each finished bucket
to its file (`batch.store.BucketSink`).

Between the score and the evidence stage a row carries `_evidence_text` (`_evidence_texts` in the wide
layout): the text to generate on (the document, or its best chunk) where it gets evidence, else null.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa

from prism_ray.data.rows import CHUNK_COLUMNS, LONG, ColumnNames, InputError, output_schema, pair_error
from prism_ray.chunking import chunk_documents, chunk_texts, fold
from prism_ray.config import ModelConfig
from prism_ray.data.backends import EngineBackend, ServeBackend
from prism_ray.ranking import ranks, wants_evidence
from prism_ray.results import EvidenceResult

EVIDENCE_TEXT = "_evidence_text"
EVIDENCE_TEXTS = "_evidence_texts"
BUCKET, ERROR = "_bucket", "_error"


@dataclass(frozen=True)
class Stage:
    """What the actors of one pipeline need to know, besides the model."""

    layout: str
    columns: ColumnNames
    evidence_top_k: int | None = None
    evidence_min_score: float | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    serve_app: str | None = None  # None: load the engines in this actor
    chunking: dict | None = None  # max_chunks_per_doc, chunk_tokens, overlap_tokens (prism_ray.chunking)
    sink: object | None = None  # the batch job's `BucketSink`: the last stage writes each bucket

    @property
    def evidence(self) -> bool:
        return self.evidence_top_k is not None


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


# -- scoring and evidence over pairs (both layouts come down to these) -------------------------------

def score_pairs(rows: list[dict], backend, stage: Stage) -> dict[str, list]:
    """Scores `rows` (dicts of query_id, query, text, _error), ranks within each query_id, and picks the
    rows that get evidence (`_evidence_text`). Column lists out, in row order."""
    by_query: dict[object, list[int]] = {}
    for i, r in enumerate(rows):
        by_query.setdefault(r["query_id"], []).append(i)
    groups, members = [], []  # one engine group per (query_id, query text)
    for idxs in by_query.values():
        by_text: dict[str, list[int]] = {}
        for i in idxs:
            if rows[i][ERROR] is None:
                by_text.setdefault(rows[i]["query"], []).append(i)
        for query, text_idxs in by_text.items():
            groups.append((query, [rows[i]["text"] for i in text_idxs]))
            members.append(text_idxs)
    n = len(rows)
    out = {"score": [None] * n, "logit": [None] * n, "rank": [None] * n, "truncated": [None] * n,
           "num_tokens": [None] * n, "error": [r[ERROR] for r in rows]}
    scored_text = [r["text"] for r in rows]
    if stage.chunking is not None:
        out.update({c: [None] * n for c in CHUNK_COLUMNS})
        chunked = [chunk_documents(backend.prompts, q, docs, **stage.chunking) for q, docs in groups]
        groups = [(q, chunk_texts(docs, cds)) for (q, docs), cds in zip(groups, chunked)]
    for g, (idxs, result) in enumerate(zip(members, backend.score(groups) if groups else [])):
        folded = fold(chunked[g], result) if stage.chunking is not None and isinstance(result, list) else None
        for j, i in enumerate(idxs):
            if isinstance(result, Exception):
                out["error"][i] = f"scoring failed: {_describe(result)}"
                continue
            if folded is None:
                for key in ("score", "logit", "truncated", "num_tokens"):
                    out[key][i] = getattr(result[j], key)
                continue
            f = folded[j]  # this document's chunks: its best one gives the score
            out["score"][i], out["logit"][i] = f.best.score, f.best.logit
            out["truncated"][i], out["num_tokens"][i] = f.truncated, f.num_tokens
            for key in ("index", "count", "start", "end"):
                out[f"chunk_{key}"][i] = f.chunk[key]
            scored_text[i] = rows[i]["text"][f.chunk["start"]:f.chunk["end"]]
    if stage.evidence:
        out[EVIDENCE_TEXT] = [None] * n
    for idxs in by_query.values():
        for i, rank in zip(idxs, ranks([out["score"][i] for i in idxs])):
            out["rank"][i] = rank
            if stage.evidence and wants_evidence(rank, out["score"][i], stage.evidence_top_k,
                                                 stage.evidence_min_score):
                out[EVIDENCE_TEXT][i] = scored_text[i]
    return out


def generate_for(queries: list, texts: list, backend, stage: Stage) -> list[EvidenceResult | Exception | None]:
    """Evidence for each (query, text) whose text is not null; None for the others."""
    want = [i for i, t in enumerate(texts) if t is not None]
    out: list[EvidenceResult | Exception | None] = [None] * len(texts)
    if want:
        results = backend.generate([(queries[i], texts[i]) for i in want], stage.max_new_tokens, stage.temperature)
        for i, res in zip(want, results):
            out[i] = res
    return out


# -- the two layouts ----------------------------------------------------------------------------------

# The columns a long row gains: the batch job's output schema (ids aside), and the hidden evidence text.
_LONG_TYPES: dict[str, pa.DataType] = {
    f.name: f.type for f in output_schema(pa.null(), pa.null(), evidence=True, chunking=True)
    if f.name not in ("query_id", "doc_id")} | {
    EVIDENCE_TEXT: pa.string()}
_CHUNK_TYPE = pa.struct([("index", pa.int32()), ("count", pa.int32()), ("start", pa.int64()), ("end", pa.int64())])
_WIDE_TYPES: dict[str, pa.DataType] = {
    "scores": pa.list_(pa.float64()), "ranking": pa.list_(pa.int32()), "truncated": pa.list_(pa.bool_()),
    "error": pa.string(), "chunks": pa.list_(_CHUNK_TYPE), EVIDENCE_TEXTS: pa.list_(pa.string()),
    "contributions": pa.list_(pa.string()), "evidences": pa.list_(pa.string()), "generations": pa.list_(pa.string()),
}


def with_columns(table: pa.Table, values: dict[str, list], types: dict[str, pa.DataType]) -> pa.Table:
    """`table` with each of `values` as a column, replacing one of the same name."""
    for name, column in values.items():
        arr = pa.array(column, types[name])
        at = table.schema.get_field_index(name)
        table = table.set_column(at, name, arr) if at >= 0 else table.append_column(name, arr)
    return table


def score_long(table: pa.Table, backend, stage: Stage) -> pa.Table:
    cols = stage.columns
    rows = [{"query_id": q, "query": t, "text": d, ERROR: e} for q, t, d, e in zip(
        table.column(cols.query_id).to_pylist(), table.column(cols.query).to_pylist(),
        table.column(cols.text).to_pylist(), table.column(ERROR).to_pylist())]
    return with_columns(table.drop_columns([ERROR]), score_pairs(rows, backend, stage), _LONG_TYPES)


def evidence_long(table: pa.Table, backend, stage: Stage) -> pa.Table:
    results = generate_for(table.column(stage.columns.query).to_pylist(), table.column(EVIDENCE_TEXT).to_pylist(),
                           backend, stage)
    errors = table.column("error").to_pylist()
    out = {"contribution": [], "evidence": [], "evidence_truncated": [], "generation": [], "error": errors}
    for i, res in enumerate(results):
        ok = isinstance(res, EvidenceResult)
        if isinstance(res, Exception):
            errors[i] = f"evidence failed: {_describe(res)}"
        out["contribution"].append(res.contribution if ok else None)
        out["evidence"].append(res.evidence if ok else None)
        out["evidence_truncated"].append(res.truncated if ok else None)
        out["generation"].append(res.text if ok else None)
    return with_columns(table.drop_columns([EVIDENCE_TEXT]), out, _LONG_TYPES)


def _wide_pairs(table: pa.Table, cols: ColumnNames) -> tuple[list[dict], list[tuple[int, int]], list[str | None]]:
    """The wide rows as pairs keyed by row (so equal query ids in two rows stay two queries), each pair's
    (row, position), and each row's own error (documents not a list)."""
    queries = table.column(cols.query).to_pylist()
    pairs, where, row_errors = [], [], [None] * table.num_rows
    for r, (query, docs) in enumerate(zip(queries, table.column(cols.documents).to_pylist())):
        if not isinstance(docs, list):
            row_errors[r] = f"{cols.documents} is null" if docs is None else f"{cols.documents} must be a list"
            continue
        for pos, doc in enumerate(docs):
            text = doc.get("text") if isinstance(doc, dict) else doc
            pairs.append({"query_id": r, "query": query, "text": text, ERROR: pair_error(query, text)})
            where.append((r, pos))
    return pairs, where, row_errors


def require_columns(table: pa.Table, cols: ColumnNames, fields: tuple[str, ...], layout: str) -> None:
    """An InputError naming the missing column and the `columns` field that names it."""
    for field in fields:
        name = getattr(cols, field)
        if name not in table.column_names:
            raise InputError(f"{layout} layout needs a {name!r} column (set columns.{field}); "
                             f"columns: {sorted(table.column_names)}")


def score_wide(table: pa.Table, backend, stage: Stage) -> pa.Table:
    cols = stage.columns
    require_columns(table, cols, ("query", "documents"), "wide")
    pairs, where, row_errors = _wide_pairs(table, cols)
    scored = score_pairs(pairs, backend, stage)
    n = table.num_rows
    sizes = [0] * n
    for r, _ in where:
        sizes[r] += 1
    lists = {"scores": "score", "truncated": "truncated"}
    if stage.chunking is not None:
        lists["chunks"] = "_chunk"
        scored["_chunk"] = [None if scored["chunk_index"][i] is None else {
            "index": scored["chunk_index"][i], "count": scored["chunk_count"][i],
            "start": scored["chunk_start"][i], "end": scored["chunk_end"][i]} for i in range(len(pairs))]
    if stage.evidence:
        lists[EVIDENCE_TEXTS] = EVIDENCE_TEXT
    out = {name: [None if row_errors[r] else [None] * sizes[r] for r in range(n)] for name in lists}
    ranking: list[list | None] = [None if row_errors[r] else [None] * sizes[r] for r in range(n)]
    problems: list[dict[str, None]] = [{} for _ in range(n)]  # distinct messages, in order
    for i, (r, pos) in enumerate(where):
        for name, key in lists.items():
            out[name][r][pos] = scored[key][i]
        if scored["rank"][i] is not None:
            ranking[r][scored["rank"][i] - 1] = pos
        if scored["error"][i] is not None:
            message = scored["error"][i]
            problems[r][message if message.startswith("query") else f"{cols.documents}[{pos}]: {message}"] = None
    out["ranking"] = [None if rk is None else [p for p in rk if p is not None] for rk in ranking]
    out["error"] = [row_errors[r] or ("; ".join(problems[r]) or None) for r in range(n)]
    return with_columns(table, out, _WIDE_TYPES)


def evidence_wide(table: pa.Table, backend, stage: Stage) -> pa.Table:
    queries = table.column(stage.columns.query).to_pylist()
    texts = table.column(EVIDENCE_TEXTS).to_pylist()
    flat_q, flat_t, where = [], [], []
    for r, row in enumerate(texts):
        for pos, text in enumerate(row or []):
            flat_q.append(queries[r])
            flat_t.append(text)
            where.append((r, pos))
    results = generate_for(flat_q, flat_t, backend, stage)
    contributions, evidences, generations = ([None if row is None else [None] * len(row) for row in texts]
                                             for _ in range(3))
    errors = table.column("error").to_pylist()
    for (r, pos), res in zip(where, results):
        if isinstance(res, EvidenceResult):
            contributions[r][pos], evidences[r][pos], generations[r][pos] = res.contribution, res.evidence, res.text
        elif isinstance(res, Exception):
            message = f"{stage.columns.documents}[{pos}]: evidence failed: {_describe(res)}"
            errors[r] = f"{errors[r]}; {message}" if errors[r] else message
    return with_columns(table.drop_columns([EVIDENCE_TEXTS]),
                        {"contributions": contributions, "evidences": evidences, "generations": generations,
                         "error": errors}, _WIDE_TYPES)


# -- the actors ------------------------------------------------------------------------------------------

class _Actor:
    """A Ray Data UDF (map_batches or map_groups) holding the backend of its tier."""

    tier = ""

    def __init__(self, model: dict, stage: Stage):
        self.stage = stage
        cfg = ModelConfig.model_validate(model)
        self.backend = (ServeBackend(cfg, self.tier, stage.serve_app) if stage.serve_app
                        else EngineBackend(cfg, self.tier))


class ScoreActor(_Actor):
    """Scores and ranks a block: a group of whole queries (long layout) or query rows (wide)."""

    tier = "scorer"

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.monotonic()
        stage = self.stage
        if stage.layout != LONG:
            return score_wide(table, self.backend, stage)
        table = score_long(table, self.backend, stage)
        if stage.sink is None:
            return table.drop_columns([BUCKET])
        if not stage.evidence:
            return stage.sink.finish(table, evidence=False, chunking=stage.chunking is not None, started=started)
        return table.drop_columns([stage.columns.text])  # not written; the evidence stage reads _evidence_text


class EvidenceActor(_Actor):
    """Evidence for a scored block's chosen documents (and, in the batch job, writes the bucket)."""

    tier = "evidence"

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.monotonic()
        if self.stage.layout != LONG:
            return evidence_wide(table, self.backend, self.stage)
        table = evidence_long(table, self.backend, self.stage)
        if self.stage.sink is None:
            return table
        return self.stage.sink.finish(table, evidence=True, chunking=self.stage.chunking is not None, started=started)
