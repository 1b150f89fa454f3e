"""A batch rerank job: parquet pairs in, scored and ranked parquet out, on the processor's stages.

    read_parquet ─► to_pairs (tasks) ─► Processor.stages(long, sink) ─► one file per bucket

The job is the processor (`prism_ray.data`) in the long layout with three things around it: the input
is read and turned into pairs (either layout) with the bucket of each query; buckets already in the
output are skipped; and the last stage writes each bucket's file (`store.BucketSink`), which is what
makes reruns resume and lost nodes harmless.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from prism_ray import __version__
from prism_ray.batch.config import BatchConfig
from prism_ray.batch.store import BucketSink, OutputStore
from prism_ray.config import ModelConfig
from prism_ray.data.config import PrismProcessorConfig
from prism_ray.data.processor import Processor
from prism_ray.data.rows import InputError, detect_layout, id_types, input_columns, to_pairs


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
    processor = Processor(_processor_config(cfg, cfg.resolve_model()))  # checks the model before any data is read
    model = processor.model
    ds, layout, schema = _read_input(cfg)
    cols = cfg.columns
    qid_type, did_type = id_types(schema, cols, layout)
    store = OutputStore(cfg.output)
    if cfg.overwrite:
        store.clear()
    input_rows = ds.count()  # parquet footers: no data is read
    num_buckets = _num_buckets(ds, input_rows, layout, cols, cfg, cfg.scorer_actors.resolve(model.scorer)[1])
    job = store.start(_job_record(cfg, model, layout, num_buckets=num_buckets))
    done = store.done()
    pairs = ds.map_batches(_pairs_udf, batch_format="pyarrow", zero_copy_batch=True, fn_kwargs={
        "cols": cols, "layout": layout, "num_buckets": job["num_buckets"], "qid_type": qid_type,
        "did_type": did_type, "skip": frozenset(done)})
    out = processor.stages(pairs, sink=BucketSink(store.location, job, qid_type, did_type,
                                                   num_buckets=job["num_buckets"]))  # the first run's win
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


def _processor_config(cfg: BatchConfig, model: ModelConfig) -> PrismProcessorConfig:
    """The processor the job runs: long pairs (`to_pairs` names them), the job's model (resolved once, passed
    inline), actors and options."""
    return PrismProcessorConfig(
        model=model.name, models=[model], layout="long",
        evidence=cfg.evidence, chunking=cfg.chunking, serve_app=cfg.serve_app,
        concurrency=cfg.scorer_actors.resolve(model.scorer),
        evidence_concurrency=cfg.evidence_actors.resolve(model.evidence))


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
