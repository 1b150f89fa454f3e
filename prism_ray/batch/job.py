"""A batch rerank job on Ray Data: parquet pairs in, scored and ranked parquet out.

    read_parquet ─► to_pairs (tasks) ─► groupby(bucket).map_groups(ScoreActor pool)
                                  [─► groupby(bucket).map_groups(EvidenceActor pool)] ─► one file per bucket

A bucket holds every pair of its queries, so an actor scores a query's documents in one engine call
(its prefix state is computed once) and ranks them; the evidence stage sees whole buckets too and
generates only for each query's top k. The stage that finishes a bucket writes its file (see
`store`), which is what makes reruns resume and lost nodes harmless.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from prism_ray import __version__
from prism_ray.batch.config import BatchConfig, resolve_model
from prism_ray.batch.rows import InputError, detect_layout, id_types, input_columns, to_pairs
from prism_ray.batch.store import OutputStore
from prism_ray.batch.work import EvidenceActor, ScoreActor, Stage
from prism_ray.config import ModelConfig
from prism_ray.factory import deployment_name, pin_checkpoint

SERVE_CLIENT_OPTIONS = {"num_cpus": 0.25}  # an actor that only holds deployment handles
MAX_SHUFFLE_PARTITIONS = 64  # a partition holds whole buckets; more only adds shuffle tasks


@dataclass
class Summary:
    output: str
    pairs: int = 0  # written by this run
    skipped: int = 0  # already in the output from an earlier run
    failed: int = 0  # written with an error instead of a score
    tokens: int = 0  # prompt tokens scored
    evidence: int = 0  # rows given contribution/evidence
    files: int = 0  # bucket files written by this run
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.pairs / self.seconds if self.seconds else 0.0
        tps = self.tokens / self.seconds if self.seconds else 0.0
        return [f"pairs written: {self.pairs} in {self.seconds:.1f} s ({rate:.2f} rows/s, {tps:.0f} tokens/s)",
                f"failed rows:   {self.failed} (see the 'error' column)",
                f"evidence rows: {self.evidence}",
                f"skipped:       {self.skipped} pairs already written by an earlier run",
                f"output:        {self.output} ({self.files} files this run)"]


def run_batch(cfg: BatchConfig, progress: bool = True) -> Summary:
    """Runs the job on the current Ray cluster (started locally if none is connected)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    model = _prepare_model(cfg)
    ds, layout, schema = _read_input(cfg)
    cols = cfg.columns
    qid_type, did_type = id_types(schema, cols, layout)
    scorer_range = cfg.scorer_actors.resolve(model.scorer)
    store = OutputStore(cfg.output)
    if cfg.overwrite:
        store.clear()
    input_rows = ds.count()  # parquet footers: no data is read
    num_buckets = _num_buckets(ds, input_rows, layout, cols, cfg, scorer_range[1])
    job = _job_record(cfg, model, layout, num_buckets=num_buckets)
    job = store.start(job)
    done = store.done()
    stage = Stage(output=store.location, metadata=job, qid_type=qid_type, did_type=did_type,
                  evidence_top_k=cfg.evidence.top_k if cfg.evidence else None,
                  evidence_min_score=cfg.evidence.min_score if cfg.evidence else None,
                  max_new_tokens=cfg.evidence.max_new_tokens if cfg.evidence else 256,
                  temperature=cfg.evidence.temperature if cfg.evidence else 0.0,
                  serve_app=cfg.serve_app,
                  chunking=cfg.chunking.model_dump(exclude_none=True) if cfg.chunking else None)
    pairs = ds.map_batches(_pairs_udf, batch_format="pyarrow", zero_copy_batch=True, fn_kwargs={
        "cols": cols, "layout": layout, "num_buckets": job["num_buckets"], "qid_type": qid_type,
        "did_type": did_type, "skip": frozenset(done)})
    spec = model.model_dump(mode="json")
    partitions = min(job["num_buckets"], MAX_SHUFFLE_PARTITIONS)
    out = pairs.groupby("_bucket", num_partitions=partitions).map_groups(
        ScoreActor, fn_constructor_args=(spec, stage), batch_format="pyarrow", compute=_pool(scorer_range),
        **_actor_options(model.scorer, cfg.serve_app))
    if cfg.evidence:
        out = out.groupby("_bucket", num_partitions=partitions).map_groups(
            EvidenceActor, fn_constructor_args=(spec, stage), batch_format="pyarrow",
            compute=_pool(cfg.evidence_actors.resolve(model.evidence)),
            **_actor_options(model.evidence, cfg.serve_app))
    summary = Summary(output=store.location, skipped=sum(done.values()))
    started = time.monotonic()
    bar = _progress_bar(progress, max(input_rows - summary.skipped, 0) if layout == "long" else None)
    for row in out.iter_rows():
        summary.pairs += row["pairs"]
        summary.failed += row["failed"]
        summary.tokens += row["tokens"]
        summary.evidence += row["evidence"]
        summary.files += 1
        if bar is not None:
            bar.update(row["pairs"])
    if bar is not None:
        bar.close()
    summary.seconds = time.monotonic() - started
    store.finish({**asdict(summary), "job": job})
    return summary


def _prepare_model(cfg: BatchConfig) -> ModelConfig:
    model = resolve_model(cfg)
    if cfg.serve_app:
        _check_serve_app(cfg.serve_app, model, evidence=cfg.evidence is not None)
        return model
    if cfg.evidence and model.evidence is None:
        raise InputError(f"model {model.name!r} has no evidence tier configured, so it cannot generate evidence")
    return pin_checkpoint(model)


def _check_serve_app(app: str, model: ModelConfig, evidence: bool) -> None:
    from ray import serve

    apps = serve.status().applications
    if app not in apps:
        raise InputError(f"no running Serve app {app!r}; running apps: {sorted(apps)}")
    deployments = apps[app].deployments
    for tier in ("scorer", "evidence") if evidence else ("scorer",):
        name = deployment_name(model.name, tier)
        if name not in deployments:
            raise InputError(f"Serve app {app!r} has no deployment {name}; it has {sorted(deployments)}")


def _read_input(cfg: BatchConfig):
    import ray

    try:
        probe = ray.data.read_parquet(cfg.input)
        schema = probe.schema().base_schema
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise InputError(f"cannot read input {cfg.input}: {exc}".splitlines()[0]) from None
    cols = cfg.columns
    layout = detect_layout(schema, cols, cfg.layout)
    return probe.select_columns(input_columns(schema, cols, layout)), layout, schema


def _num_buckets(ds, rows: int, layout: str, cols, cfg: BatchConfig, max_actors: int) -> int:
    """About `pairs_per_file` pairs per bucket, and enough buckets to keep every actor busy."""
    if layout == "wide" and rows:
        sample = ds.limit(64).take_all()
        rows = math.ceil(rows * sum(len(r[cols.documents] or []) for r in sample) / len(sample))
    return max(math.ceil(rows / cfg.pairs_per_file), 4 * max_actors, 1)


def _job_record(cfg: BatchConfig, model: ModelConfig, layout: str, num_buckets: int) -> dict:
    """What the output's manifest and every file's parquet metadata say about the run."""
    return {
        "input": cfg.input if "://" in cfg.input else str(Path(cfg.input).expanduser().resolve()),
        "layout": layout, "columns": cfg.columns.model_dump(),
        "model": model.name, "checkpoint": model.model, "dtype": model.dtype, "max_length": model.max_length,
        "evidence": cfg.evidence.model_dump() if cfg.evidence else None,
        "num_buckets": num_buckets, "prism_ray_version": __version__,
    }


def _pool(size: tuple[int, int]):
    import ray.data

    return ray.data.ActorPoolStrategy(min_size=size[0], max_size=size[1])


def _actor_options(tier, serve_app: str | None) -> dict:
    if serve_app or tier is None:
        return dict(SERVE_CLIENT_OPTIONS)
    return dict(tier.ray_actor_options)


def _pairs_udf(batch: pa.Table, cols, layout, num_buckets, qid_type, did_type, skip: frozenset) -> pa.Table:
    pairs = to_pairs(batch, cols, layout, num_buckets, qid_type, did_type)
    if skip:
        import pyarrow.compute as pc

        pairs = pairs.filter(pc.invert(pc.is_in(pairs.column("_bucket"), pa.array(sorted(skip), pa.int64()))))
    return pairs


def _progress_bar(enabled: bool, total: int | None):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="pair", desc="reranking", file=sys.stderr, dynamic_ncols=True)
