"""What a Ray Data actor does with one bucket: score it (and rank), generate evidence, write it.

Two backends do the model work: `EngineBackend` wraps the same ScoreEngine / EvidenceEngine classes
the Serve tiers wrap, loaded inside the actor; `ServeBackend` sends the same calls to a running
Serve app's scorer and evidence deployments through deployment handles. Everything else (grouping
by query, ranks, which rows get evidence, error rows, the output file) is shared.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

import pyarrow as pa

from prism_ray.batch.rows import CHUNK_COLUMNS, output_schema
from prism_ray.batch.store import OutputStore
from prism_ray.chunking import best_chunk, chunk_documents, chunk_texts, per_document
from prism_ray.config import ModelConfig
from prism_ray.factory import Tier, build_engine, deployment_name
from prism_ray.ranking import ranks, wants_evidence


@dataclass(frozen=True)
class Stage:
    """What the actors of one job need to know, besides the model."""

    output: str
    metadata: dict
    qid_type: pa.DataType
    did_type: pa.DataType
    evidence_top_k: int | None = None
    evidence_min_score: float | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    serve_app: str | None = None  # None: load the engines in this actor
    chunking: dict | None = None  # max_chunks_per_doc, chunk_tokens, overlap_tokens (prism_ray.chunking)


# -- backends ---------------------------------------------------------------------------------------

class EngineBackend:
    """The engines, in this process. Each actor loads only the engine its stage needs."""

    def __init__(self, model: ModelConfig, tier: Tier):
        engine = build_engine(model, tier)  # the very factory the Serve tiers call
        self.model = model
        self.scorer = engine if tier == "scorer" else None
        self.evidence = engine if tier == "evidence" else None
        self.prompts = engine.prompts

    def score(self, groups: list[tuple[str, list[str]]]) -> list[list[dict] | Exception]:
        try:  # every query of the bucket in one engine call: their rows share forward passes
            return [[dataclasses.asdict(r) for r in res] for res in self.scorer.score(groups)]
        except Exception:  # noqa: BLE001 - retry one group at a time so a bad one fails alone
            pass
        out: list[list[dict] | Exception] = []
        for query, docs in groups:
            try:
                out.append([dataclasses.asdict(r) for r in self.scorer.score([(query, docs)])[0]])
            except Exception as exc:  # noqa: BLE001 - recorded in the rows' error column
                out.append(exc)
        return out

    @functools.cached_property
    def scheduler(self):
        """The evidence engine's decode loop, as a Serve replica runs it; no queue bound: a bucket's pairs are
        submitted at once, and the bucket bounds them."""
        from prism_ray.engine import Scheduler

        return Scheduler(self.evidence, self.model.evidence.max_active_pairs, max_queued_pairs=None)

    def generate(self, pairs: list[tuple[str, str]], max_new_tokens: int, temperature: float) -> list[dict | Exception]:
        """Every pair submitted at once: they share the decode loop's steps, and a bad one fails alone. A pair
        whose step failed is tried again on its own, in case another pair broke that step."""
        handles = self.scheduler.submit_many(pairs, max_new_tokens, temperature)
        out: list[dict | Exception | None] = []
        for h in handles:
            try:
                out.append(dataclasses.asdict(h.result()))
            except ValueError as exc:  # a bad pair: recorded in the rows' error column
                out.append(exc)
            except Exception:  # noqa: BLE001 - its step failed: tried alone below, once the loop is idle
                out.append(None)
        for i, pair in enumerate(pairs):
            if out[i] is None:
                try:
                    out[i] = dataclasses.asdict(self.evidence.generate([pair], max_new_tokens, temperature)[0])
                except Exception as exc:  # noqa: BLE001
                    out[i] = exc
        return out


class ServeBackend:
    """A running Serve app's `<model>-scorer` / `<model>-evidence` deployments; requests go out together
    so the deployments' own batching gathers them with online traffic."""

    def __init__(self, model: ModelConfig, tier: str, app: str):
        from ray import serve

        self.handle = serve.get_deployment_handle(deployment_name(model.name, tier), app_name=app)
        self.model = model

    @functools.cached_property
    def prompts(self):
        """The model's prompt tokenizer, for cutting chunks here (the replicas hold their own)."""
        from transformers import AutoTokenizer

        from prism_ray.prompt import PrismPromptTokenizer

        return PrismPromptTokenizer(AutoTokenizer.from_pretrained(self.model.model), max_length=self.model.max_length)

    def score(self, groups):
        return _gather([self.handle.score.remote(q, docs) for q, docs in groups])

    def generate(self, pairs, max_new_tokens, temperature):
        return _gather([self.handle.generate.remote(q, d, max_new_tokens, temperature) for q, d in pairs])


def _gather(responses) -> list:
    out = []
    for r in responses:
        try:
            out.append(r.result())
        except Exception as exc:  # noqa: BLE001 - recorded in the rows' error column
            out.append(exc)
    return out


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


# -- the two stages -----------------------------------------------------------------------------------

def score_bucket(rows: list[dict], backend, stage: Stage) -> dict[str, list]:
    """Scores, ranks within each query, and marks the rows that get evidence. Column lists out."""
    by_query: dict[object, list[int]] = {}
    for i, r in enumerate(rows):
        by_query.setdefault(r["query_id"], []).append(i)
    groups, members = [], []  # one engine group per (query_id, query text)
    for idxs in by_query.values():
        by_text: dict[str, list[int]] = {}
        for i in idxs:
            if rows[i]["_error"] is None:
                by_text.setdefault(rows[i]["query"], []).append(i)
        for query, text_idxs in by_text.items():
            groups.append((query, [rows[i]["text"] for i in text_idxs]))
            members.append(text_idxs)
    n = len(rows)
    out = {"score": [None] * n, "logit": [None] * n, "truncated": [None] * n, "num_tokens": [None] * n,
           "error": [r["_error"] for r in rows], "rank": [None] * n, "_evidence": [False] * n}
    if stage.chunking is not None:
        out.update({c: [None] * n for c in CHUNK_COLUMNS}, _scored_text=[r["text"] for r in rows])
        chunked = [chunk_documents(backend.prompts, q, docs, **stage.chunking) for q, docs in groups]
        groups = [(q, chunk_texts(docs, cds)) for (q, docs), cds in zip(groups, chunked)]
    for g, (idxs, result) in enumerate(zip(members, backend.score(groups) if groups else [])):
        by_doc = per_document(chunked[g], result) if stage.chunking is not None and isinstance(result, list) else None
        for j, i in enumerate(idxs):
            if isinstance(result, Exception):
                out["error"][i] = f"scoring failed: {_describe(result)}"
                continue
            if stage.chunking is None:
                for key in ("score", "logit", "truncated", "num_tokens"):
                    out[key][i] = result[j][key]
                continue
            doc, mine = chunked[g][j], by_doc[j]  # this document's chunks: its best one gives the score
            k = best_chunk([r["score"] for r in mine])
            span = doc.chunks[k]
            out["score"][i], out["logit"][i] = mine[k]["score"], mine[k]["logit"]
            out["truncated"][i] = doc.truncated or any(r["truncated"] for r in mine)
            out["num_tokens"][i] = sum(r["num_tokens"] for r in mine)
            out["chunk_index"][i], out["chunk_count"][i] = k, len(doc.chunks)
            out["chunk_start"][i], out["chunk_end"][i] = span.start, span.end
            out["_scored_text"][i] = rows[i]["text"][span.start:span.end]
    for idxs in by_query.values():
        for i, rank in zip(idxs, ranks([out["score"][i] for i in idxs])):
            out["rank"][i] = rank
            out["_evidence"][i] = (stage.evidence_top_k is not None
                                   and wants_evidence(rank, out["score"][i], stage.evidence_top_k,
                                                      stage.evidence_min_score))
    return out


def add_evidence(rows: list[dict], backend, stage: Stage) -> None:
    """Fills contribution/evidence for the marked rows, in place."""
    for r in rows:
        r.update(contribution=None, evidence=None, evidence_truncated=None, generation=None)
    want = [r for r in rows if r["_evidence"]]
    if not want:
        return
    results = backend.generate([(r["query"], r["text"]) for r in want], stage.max_new_tokens, stage.temperature)
    for r, res in zip(want, results):
        if isinstance(res, Exception):
            r["error"] = f"evidence failed: {_describe(res)}"
        else:
            r.update(contribution=res["contribution"], evidence=res["evidence"],
                     evidence_truncated=res["truncated"], generation=res["text"])


def finish_bucket(rows: list[dict], stage: Stage, started: float) -> pa.Table:
    """Writes the bucket's output file and returns the one-row summary the driver counts."""
    if not rows:
        return SUMMARY_SCHEMA.empty_table()
    schema = output_schema(stage.qid_type, stage.did_type, evidence=stage.evidence_top_k is not None,
                           chunking=stage.chunking is not None)
    table = pa.Table.from_pylist([{f: r[f] for f in schema.names} for r in rows], schema=schema)
    bucket = rows[0]["_bucket"]
    OutputStore(stage.output).write_bucket(bucket, table, stage.metadata)
    return pa.Table.from_pylist([{
        "bucket": bucket, "pairs": len(rows),
        "failed": sum(r["error"] is not None for r in rows),
        "tokens": sum(r["num_tokens"] or 0 for r in rows),
        "evidence": sum(bool(r.get("_evidence")) and r.get("generation") is not None for r in rows),
        "seconds": time.monotonic() - started,
    }], schema=SUMMARY_SCHEMA)


SUMMARY_SCHEMA = pa.schema([("bucket", pa.int64()), ("pairs", pa.int64()), ("failed", pa.int64()),
                            ("tokens", pa.int64()), ("evidence", pa.int64()), ("seconds", pa.float64())])


class _BucketActor:
    """A map_groups UDF over buckets, holding the backend of its tier."""

    tier = ""

    def __init__(self, model: dict, stage: Stage):
        self.stage = stage
        cfg = ModelConfig.model_validate(model)
        self.backend = (ServeBackend(cfg, self.tier, stage.serve_app) if stage.serve_app
                        else EngineBackend(cfg, self.tier))


class ScoreActor(_BucketActor):
    """Score + rank a bucket; write it unless evidence comes next."""

    tier = "scorer"

    def __call__(self, pairs: pa.Table) -> pa.Table:
        started = time.monotonic()
        rows = pairs.to_pylist()
        scored = score_bucket(rows, self.backend, self.stage)
        if self.stage.evidence_top_k is None:
            scored.pop("_scored_text", None)
            rows = [{**p, **{k: v[i] for k, v in scored.items()}} for i, p in enumerate(rows)]
            return finish_bucket(rows, self.stage, started)
        # Evidence comes next: keep the text only where it will be read (with chunking, the best chunk).
        scored_text = scored.pop("_scored_text", None) or [r["text"] for r in rows]
        texts = [t if keep else None for t, keep in zip(scored_text, scored["_evidence"])]
        table = pairs.set_column(pairs.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
        table = table.drop_columns(["_error"])
        for key, values in scored.items():
            table = table.append_column(key, pa.array(values, _SCORED_TYPES[key]))
        return table


_SCORED_TYPES: dict[str, pa.DataType] = {
    "score": pa.float64(), "logit": pa.float64(), "truncated": pa.bool_(), "num_tokens": pa.int32(),
    "error": pa.string(), "rank": pa.int32(), "_evidence": pa.bool_(),
    "chunk_index": pa.int32(), "chunk_count": pa.int32(), "chunk_start": pa.int64(), "chunk_end": pa.int64(),
}


class EvidenceActor(_BucketActor):
    """Evidence for a scored bucket's marked rows, then write the bucket."""

    tier = "evidence"

    def __call__(self, scored: pa.Table) -> pa.Table:
        started = time.monotonic()
        rows = scored.to_pylist()
        add_evidence(rows, self.backend, self.stage)
        return finish_bucket(rows, self.stage, started)
