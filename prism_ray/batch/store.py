"""The output directory: one parquet file per bucket, written whole or not at all.

    out/_prism_job.json     what the job is (input, model, settings, bucket count): a rerun must match
    out/part-00007.parquet  every pair of bucket 7, scored (and ranked, with evidence if asked)
    out/_SUCCESS            the last run's summary, once every bucket is written

Exactly-once comes from three facts: a bucket's file name depends only on the bucket; a file is
written under a temporary name and then moved into place, so a reader (or a rerun) sees it whole or
not at all; and a retried task (a lost node) rewrites the same name with the same content. A rerun
skips the buckets whose files exist.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from prism_ray.data.rows import output_schema

MANIFEST = "_prism_job.json"
SUCCESS = "_SUCCESS"
METADATA_KEY = b"prism"
_PART = re.compile(r"^part-(\d{5,})\.parquet$")


class OutputMismatch(ValueError):
    """The output directory holds a different job; the message says which setting differs."""


class OutputStore:
    def __init__(self, uri: str):
        self.uri = uri
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())

    @property
    def location(self) -> str:
        """Where the output is, as a user would type it (an absolute path for local output)."""
        return self.uri if "://" in self.uri else self.root

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self) -> bool:
        return self.fs.get_file_info(self.root).type != pafs.FileType.NotFound

    def clear(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.root)

    def read_manifest(self) -> dict | None:
        if self.fs.get_file_info(self._path(MANIFEST)).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(self._path(MANIFEST)) as f:
            return json.loads(f.read().decode())

    def start(self, job: dict) -> dict:
        """Record a new job, or check that a rerun is the same job; returns the manifest in force.

        `job["num_buckets"]` of the first run wins: the buckets must not move between runs.
        """
        self.fs.create_dir(self.root, recursive=True)
        old = self.read_manifest()
        if old is None:
            self._write_bytes(MANIFEST, json.dumps(job, indent=2, sort_keys=True).encode())
            return job
        for key, value in job.items():
            if key != "num_buckets" and old.get(key) != value:
                raise OutputMismatch(f"output {self.uri} holds a job with a different {key} "
                                     f"({old.get(key)!r}, now {value!r}); use a new output or --overwrite")
        return old

    def done(self) -> dict[int, int]:
        """Buckets already written, with their row counts (from the parquet footers)."""
        out = {}
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)):
            m = _PART.match(info.base_name)
            if m:
                with self.fs.open_input_file(info.path) as f:
                    out[int(m.group(1))] = pq.ParquetFile(f).metadata.num_rows
        return out

    def write_bucket(self, bucket: int, table: pa.Table, metadata: dict) -> None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
        tmp = self._path(f"_tmp/part-{bucket:05d}.{uuid.uuid4().hex}.parquet")
        self.fs.create_dir(self._path("_tmp"), recursive=True)
        with self.fs.open_output_stream(tmp) as f:
            pq.write_table(table, f)
        self.fs.move(tmp, self._path(f"part-{bucket:05d}.parquet"))

    def finish(self, summary: dict) -> None:
        self.fs.delete_dir_contents(self._path("_tmp"), missing_dir_ok=True)
        self._write_bytes(SUCCESS, json.dumps(summary, indent=2).encode())

    def _write_bytes(self, name: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._path(name)) as f:
            f.write(data)


@dataclass(frozen=True)
class BucketSink:
    """The job's last stage, inside the processor's actor: writes a finished bucket's file and returns the
    one-row summary the driver counts instead of the rows."""

    output: str
    metadata: dict
    qid_type: pa.DataType
    did_type: pa.DataType
    num_buckets: int  # the job's query groups (`_bucket` is set by `data.rows.to_pairs`)

    def finish(self, table: pa.Table, evidence: bool, chunking: bool, started: float) -> pa.Table:
        if not table.num_rows:
            return SUMMARY_SCHEMA.empty_table()
        schema = output_schema(self.qid_type, self.did_type, evidence=evidence, chunking=chunking)
        bucket = table.column("_bucket")[0].as_py()
        OutputStore(self.output).write_bucket(bucket, table.select(schema.names).cast(schema), self.metadata)
        return pa.Table.from_pylist([{
            "bucket": bucket, "pairs": table.num_rows,
            "failed": table.num_rows - table.column("error").null_count,
            "tokens": sum(t or 0 for t in table.column("num_tokens").to_pylist()),
            "evidence": table.num_rows - table.column("generation").null_count if evidence else 0,
            "seconds": time.monotonic() - started,
        }], schema=SUMMARY_SCHEMA)


SUMMARY_SCHEMA = pa.schema([("bucket", pa.int64()), ("pairs", pa.int64()), ("failed", pa.int64()),
                            ("tokens", pa.int64()), ("evidence", pa.int64()), ("seconds", pa.float64())])
