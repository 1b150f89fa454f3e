"""Writes an example input dataset: queries about Python with real English passages.

    python jobs/example_data.py data/pairs/ [--queries 100] [--docs 20] [--files 4] [--layout long|wide]

Passages come from Python's bundled documentation (`pydoc_data.topics`), so this works offline. Each
query asks about one documentation topic; its documents are passages of that topic and of others.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def example_pairs(num_queries: int = 100, docs_per_query: int = 20, words: int = 120) -> dict[str, list]:
    """Long-layout columns: query_id, query, doc_id, text."""
    import pydoc_data.topics

    topics = sorted((k, v) for k, v in pydoc_data.topics.topics.items() if len(v.split()) >= 2 * words)
    passages = [(k, " ".join(v.split()[start:start + words])) for k, v in topics for start in (0, words)]
    rows: dict[str, list] = {"query_id": [], "query": [], "doc_id": [], "text": []}
    for q in range(num_queries):
        topic = topics[q % len(topics)][0]
        query = f"How does {topic.replace('-', ' ')} work in Python?"
        for d in range(docs_per_query):
            key, text = passages[(q * 2 + d * 7) % len(passages)]
            rows["query_id"].append(f"q{q:04d}")
            rows["query"].append(query)
            rows["doc_id"].append(f"{key}#{d}")
            rows["text"].append(text)
    return rows


def write_example(out: str | Path, num_queries: int = 100, docs_per_query: int = 20, files: int = 4,
                  layout: str = "long") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = example_pairs(num_queries, docs_per_query)
    table = pa.table(rows)
    if layout == "wide":
        n = docs_per_query
        table = pa.table({"query_id": rows["query_id"][::n], "query": rows["query"][::n],
                          "documents": [rows["text"][i:i + n] for i in range(0, len(rows["text"]), n)],
                          "doc_ids": [rows["doc_id"][i:i + n] for i in range(0, len(rows["doc_id"]), n)]})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step = -(-table.num_rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * step, step), out / f"part-{i}.parquet")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--layout", choices=["long", "wide"], default="long")
    args = ap.parse_args()
    out = write_example(args.out, args.queries, args.docs, args.files, args.layout)
    print(f"wrote {args.queries} queries x {args.docs} documents ({args.layout} layout) to {out}/")


if __name__ == "__main__":
    main()
