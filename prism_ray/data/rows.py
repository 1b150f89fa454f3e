"""Input rows → pairs, and scored pairs → output rows. Plain pyarrow; no Ray, no model.

Both input layouts become one long table of pairs:

    query_id, query, doc_id, text, _bucket, _error

`_bucket` is a stable hash of `query_id`: every pair of a query lands in the same bucket, each bucket
becomes one output file, and so a rerun knows which pairs are done from which files exist.
`_error` is null for a good pair and says what is wrong otherwise; such pairs are carried to the
output, never scored, and never stop the job.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

LONG, WIDE = "long", "wide"


class ColumnNames(BaseModel):
    """Names of the input columns (each a CLI option / job config field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    query_id: str = "query_id"
    query: str = "query"
    doc_id: str = "doc_id"
    text: str = "text"
    documents: str = "documents"
    doc_ids: str = "doc_ids"


class InputError(ValueError):
    """The input dataset does not have the columns the job needs; the message names the option."""


def detect_layout(schema: pa.Schema, cols: ColumnNames, layout: str = "auto") -> str:
    """long or wide, from the columns present (or checked against the layout asked for)."""
    names = set(schema.names)
    if layout == "auto":
        if cols.documents in names and cols.text not in names:
            layout = WIDE
        elif cols.text in names:
            layout = LONG
        else:
            raise InputError(f"input has neither a {cols.text!r} column (long layout, --text-column) nor a "
                             f"{cols.documents!r} column (wide layout, --documents-column); columns: {sorted(names)}")
    need = {LONG: [("query_id", cols.query_id), ("query", cols.query), ("doc_id", cols.doc_id), ("text", cols.text)],
            WIDE: [("query_id", cols.query_id), ("query", cols.query), ("documents", cols.documents)]}[layout]
    for option, name in need:
        if name not in names:
            flag = f"--{option.replace('_', '-')}-column"
            raise InputError(f"{layout} layout needs a {name!r} column (set {flag}); columns: {sorted(names)}")
    return layout


def input_columns(schema: pa.Schema, cols: ColumnNames, layout: str) -> list[str]:
    if layout == LONG:
        return [cols.query_id, cols.query, cols.doc_id, cols.text]
    extra = [cols.doc_ids] if cols.doc_ids in schema.names else []
    return [cols.query_id, cols.query, cols.documents, *extra]


def id_types(schema: pa.Schema, cols: ColumnNames, layout: str) -> tuple[pa.DataType, pa.DataType]:
    """Arrow types of the output's query_id and doc_id: the input's, so ids round-trip unchanged."""
    qtype = schema.field(cols.query_id).type
    if layout == LONG:
        return qtype, schema.field(cols.doc_id).type
    if cols.doc_ids in schema.names:
        t = schema.field(cols.doc_ids).type
        return qtype, t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) else pa.string()
    return qtype, pa.int64()  # a document's position in the list


def bucket_of(query_id, num_buckets: int) -> int:
    """Stable across processes and runs (unlike hash()), so a resumed job picks the same buckets."""
    digest = hashlib.blake2b(str(query_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_buckets


def pair_error(query, text) -> str | None:
    """What makes a pair unscorable, in the words a user needs to fix the row; None if it is fine."""
    if query is None:
        return "query is null"
    if not isinstance(query, str):
        return f"query must be a string, not {type(query).__name__}"
    if not query.strip():
        return "query is empty"
    if text is None:
        return "text is null"
    if not isinstance(text, str):
        return f"text must be a string, not {type(text).__name__}"
    return None


def to_pairs(table: pa.Table, cols: ColumnNames, layout: str, num_buckets: int,
             qid_type: pa.DataType, did_type: pa.DataType) -> pa.Table:
    """One row per (query, document) pair, with its bucket and its error (if any)."""
    qids = table.column(cols.query_id).to_pylist()
    queries = table.column(cols.query).to_pylist()
    out: dict[str, list] = {"query_id": [], "query": [], "doc_id": [], "text": [], "_error": []}

    def add(qid, query, did, text, error=None):
        error = error or pair_error(query, text)
        out["query_id"].append(qid)
        out["query"].append(query if isinstance(query, str) else None)
        out["doc_id"].append(did)
        out["text"].append(text if isinstance(text, str) and error is None else None)
        out["_error"].append(error)

    if layout == LONG:
        for qid, query, did, text in zip(qids, queries, table.column(cols.doc_id).to_pylist(),
                                         table.column(cols.text).to_pylist()):
            add(qid, query, did, text)
    else:
        docs_col = table.column(cols.documents).to_pylist()
        ids_col = table.column(cols.doc_ids).to_pylist() if cols.doc_ids in table.column_names else None
        for row, (qid, query, docs) in enumerate(zip(qids, queries, docs_col)):
            ids = ids_col[row] if ids_col is not None else None
            if not isinstance(docs, list):
                add(qid, query, None, None, f"{cols.documents} is null" if docs is None else
                    f"{cols.documents} must be a list of strings")
                continue
            if ids is not None and len(ids) != len(docs):
                for pos, doc in enumerate(docs):
                    add(qid, query, ids[pos] if pos < len(ids) else None, doc,
                        f"{cols.doc_ids} has {len(ids)} ids for {len(docs)} documents")
                continue
            for pos, doc in enumerate(docs):
                add(qid, query, ids[pos] if ids is not None else pos, doc)
    out["_bucket"] = [bucket_of(q, num_buckets) for q in out["query_id"]]
    return pa.table(out, schema=pairs_schema(qid_type, did_type))


def pairs_schema(qid_type: pa.DataType, did_type: pa.DataType) -> pa.Schema:
    return pa.schema([("query_id", qid_type), ("query", pa.string()), ("doc_id", did_type), ("text", pa.string()),
                      ("_error", pa.string()), ("_bucket", pa.int64())])


CHUNK_COLUMNS = ("chunk_index", "chunk_count", "chunk_start", "chunk_end")


def output_schema(qid_type: pa.DataType, did_type: pa.DataType, evidence: bool, chunking: bool = False) -> pa.Schema:
    """With chunking, the best chunk of each document: its index among `chunk_count` chunks and its
    character span `text[chunk_start:chunk_end]` (the text the score and the evidence are for)."""
    fields = [("query_id", qid_type), ("doc_id", did_type), ("score", pa.float64()), ("logit", pa.float64()),
              ("rank", pa.int32()), ("truncated", pa.bool_()), ("num_tokens", pa.int32())]
    if chunking:
        fields += [("chunk_index", pa.int32()), ("chunk_count", pa.int32()), ("chunk_start", pa.int64()),
                   ("chunk_end", pa.int64())]
    if evidence:
        fields += [("contribution", pa.string()), ("evidence", pa.string()), ("evidence_truncated", pa.bool_()),
                   ("generation", pa.string())]
    fields += [("error", pa.string())]
    return pa.schema(fields)
