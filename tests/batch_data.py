"""Parquet inputs for the batch tests: queries with real English documents, in either layout."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import english_texts

QUESTIONS = ["How are exceptions handled in Python?", "What does the with statement do?",
             "How do I define a class?", "What is a generator?", "How does import work?"]


def long_rows(num_queries: int, docs_per_query: int) -> dict[str, list]:
    texts = english_texts(num_queries * docs_per_query, lo=10, hi=60)
    rows: dict[str, list] = {"query_id": [], "query": [], "doc_id": [], "text": []}
    for q in range(num_queries):
        for d in range(docs_per_query):
            rows["query_id"].append(f"q{q:03d}")
            rows["query"].append(f"{QUESTIONS[q % len(QUESTIONS)]} (case {q})")
            rows["doc_id"].append(f"q{q:03d}-d{d}")
            rows["text"].append(texts[q * docs_per_query + d])
    return rows


def write_files(table: pa.Table, directory: Path, num_files: int) -> Path:
    """The table split row-wise into several parquet files (a query may straddle two files)."""
    directory.mkdir(parents=True, exist_ok=True)
    step = -(-table.num_rows // num_files)
    for i in range(num_files):
        pq.write_table(table.slice(i * step, step), directory / f"part-{i}.parquet")
    return directory


def groups(rows: dict[str, list]) -> dict[str, tuple[str, list[str], list[str]]]:
    """query_id -> (query, doc ids, texts) of a long-layout dict."""
    out: dict[str, tuple[str, list[str], list[str]]] = {}
    for qid, query, did, text in zip(rows["query_id"], rows["query"], rows["doc_id"], rows["text"]):
        out.setdefault(qid, (query, [], []))
        out[qid][1].append(did)
        out[qid][2].append(text)
    return out
