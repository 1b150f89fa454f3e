"""Batch jobs on a real local Ray cluster (one per module), with the tiny test checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_data import groups, long_rows, write_files

from prism_ray.batch import BatchConfig, run_batch
from prism_ray.batch.store import METADATA_KEY
from prism_ray.engine import EvidenceEngine, ScoreEngine

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.cluster  # starts a Ray cluster


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=4, object_store_memory=128 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return ScoreEngine(tiny_ckpt, dtype="float32")


def _job(tiny_ckpt, inp, out, **kw) -> BatchConfig:
    return BatchConfig(input=str(inp), output=str(out), model=str(tiny_ckpt), dtype="float32", **kw)


def _read(out: Path) -> pa.Table:
    return pq.read_table(out)


def _by_key(table: pa.Table) -> dict[tuple, dict]:
    return {(r["query_id"], r["doc_id"]): r for r in table.to_pylist()}


def test_long_layout_scores_ranks_and_metadata(cluster, tiny_ckpt, engine, tmp_path):
    rows = long_rows(6, 7)
    inp = write_files(pa.table(rows), tmp_path / "in", num_files=3)
    summary = run_batch(_job(tiny_ckpt, inp, tmp_path / "out", pairs_per_file=10), progress=False)
    out = _read(tmp_path / "out")
    assert summary.pairs == out.num_rows == 42 and summary.failed == 0 and summary.skipped == 0
    assert summary.tokens == sum(out.column("num_tokens").to_pylist()) > 0
    got = _by_key(out)
    assert len(got) == 42
    for qid, (query, dids, texts) in groups(rows).items():
        expected = engine.score_pairs(query, texts)
        scores = [got[(qid, d)]["score"] for d in dids]
        for e, s, d in zip(expected, scores, dids):
            assert abs(e.score - s) <= TOL and abs(e.logit - got[(qid, d)]["logit"]) <= 10 * TOL
            assert got[(qid, d)]["truncated"] is False and got[(qid, d)]["error"] is None
        order = sorted(range(len(dids)), key=lambda i: -expected[i].score)
        assert [got[(qid, dids[i])]["rank"] for i in order] == list(range(1, len(dids) + 1))
    meta = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet"))).metadata[METADATA_KEY]
    assert b'"checkpoint"' in meta and str(tiny_ckpt).encode() in meta and b'"max_length"' in meta


def test_wide_layout_with_and_without_doc_ids_and_column_options(cluster, tiny_ckpt, engine, tmp_path):
    g = groups(long_rows(4, 5))
    wide = pa.table({"qid": list(g), "question": [v[0] for v in g.values()], "docs": [v[2] for v in g.values()],
                     "ids": [v[1] for v in g.values()]})
    cols = {"query_id": "qid", "query": "question", "documents": "docs", "doc_ids": "ids"}
    write_files(wide, tmp_path / "in", num_files=2)
    run_batch(_job(tiny_ckpt, tmp_path / "in", tmp_path / "out", columns=cols), progress=False)
    got = _by_key(_read(tmp_path / "out"))
    assert set(got) == {(q, d) for q, v in g.items() for d in v[1]}
    for qid, (query, dids, texts) in g.items():
        for e, d in zip(engine.score_pairs(query, texts), dids):
            assert abs(got[(qid, d)]["score"] - e.score) <= TOL
    # Without a doc id column, a document's id is its position in the list.
    pq.write_table(wide.drop_columns(["ids"]), tmp_path / "noids.parquet")
    # Output given as a URI goes through pyarrow's filesystem layer, as s3:// or gs:// would.
    run_batch(_job(tiny_ckpt, tmp_path / "noids.parquet", f"file://{tmp_path / 'out2'}", columns=cols), progress=False)
    out2 = _read(tmp_path / "out2")
    assert out2.schema.field("doc_id").type == pa.int64()
    got2 = _by_key(out2)
    for qid, (_, dids, _) in g.items():
        for pos, d in enumerate(dids):
            assert got2[(qid, pos)]["score"] == pytest.approx(got[(qid, d)]["score"], abs=TOL)


def test_evidence_only_for_top_k_and_equal_to_evidence_engine(cluster, tiny_ckpt, engine, tmp_path):
    rows = long_rows(3, 5)
    write_files(pa.table(rows), tmp_path / "in", num_files=1)
    job = _job(tiny_ckpt, tmp_path / "in", tmp_path / "out", evidence={"top_k": 2, "max_new_tokens": 12})
    summary = run_batch(job, progress=False)
    got = _by_key(_read(tmp_path / "out"))
    ev = EvidenceEngine(engine.loaded)
    assert summary.evidence == 6
    for qid, (query, dids, texts) in groups(rows).items():
        top = [i for i in range(len(dids)) if got[(qid, dids[i])]["rank"] <= 2]
        assert len(top) == 2
        expected = ev.generate([(query, texts[i]) for i in top], max_new_tokens=12)
        for i, e in zip(top, expected):
            r = got[(qid, dids[i])]
            assert r["generation"] == e.text and r["contribution"] == e.contribution and r["evidence"] == e.evidence
            assert r["evidence_truncated"] == e.truncated
        for i in set(range(len(dids))) - set(top):
            r = got[(qid, dids[i])]
            assert r["generation"] is None and r["evidence"] is None and r["contribution"] is None


def test_bad_rows_are_written_with_an_error_and_counted(cluster, tiny_ckpt, engine, tmp_path):
    table = pa.table({
        "query_id": ["a", "a", "a", "b", "c", "d", "d"],
        "query": ["good question", "good question", "good question", None, "   ", "fine", "fine"],
        "doc_id": [1, 2, 3, 4, 5, 6, 7],
        "text": ["water boils at 100 C", None, "ice melts at 0 C", "x", "y", "z", "w"],
    })
    write_files(table, tmp_path / "in", num_files=1)
    summary = run_batch(_job(tiny_ckpt, tmp_path / "in", tmp_path / "out"), progress=False)
    got = _by_key(_read(tmp_path / "out"))
    assert len(got) == 7 and summary.failed == 3 and summary.pairs == 7
    assert got[("a", 2)]["error"] == "text is null" and got[("a", 2)]["score"] is None and got[("a", 2)]["rank"] is None
    assert got[("b", 4)]["error"] == "query is null"
    assert got[("c", 5)]["error"] == "query is empty"
    good = engine.score_pairs("good question", ["water boils at 100 C", "ice melts at 0 C"])
    assert abs(got[("a", 1)]["score"] - good[0].score) <= TOL and abs(got[("a", 3)]["score"] - good[1].score) <= TOL
    assert sorted([got[("a", 1)]["rank"], got[("a", 3)]["rank"]]) == [1, 2]
    assert got[("d", 6)]["error"] is None and got[("d", 7)]["error"] is None

    # A column of the wrong type is a bad row per row, not a crash.
    ints = pa.table({"query_id": ["q", "q"], "query": ["a question", "a question"], "doc_id": ["x", "y"],
                     "documents": [[1, 2], None]})
    pq.write_table(ints, tmp_path / "ints.parquet")
    run_batch(_job(tiny_ckpt, tmp_path / "ints.parquet", tmp_path / "out_ints"), progress=False)
    errors = sorted(r["error"] for r in _read(tmp_path / "out_ints").to_pylist())
    assert errors == ["documents is null", "text must be a string, not int", "text must be a string, not int"]


def test_input_and_output_mistakes_name_the_option(cluster, tiny_ckpt, tmp_path):
    from prism_ray.batch.store import OutputMismatch
    from prism_ray.data.rows import InputError

    pq.write_table(pa.table({"qid": ["q"], "query": ["x"], "doc_id": ["d"], "text": ["t"]}), tmp_path / "a.parquet")
    with pytest.raises(InputError, match="'query_id' column.*--query-id-column"):
        run_batch(_job(tiny_ckpt, tmp_path / "a.parquet", tmp_path / "out"), progress=False)
    with pytest.raises(InputError, match="cannot read input"):
        run_batch(_job(tiny_ckpt, tmp_path / "missing", tmp_path / "out"), progress=False)
    run_batch(_job(tiny_ckpt, tmp_path / "a.parquet", tmp_path / "out", columns={"query_id": "qid"}), progress=False)
    with pytest.raises(OutputMismatch, match="different evidence"):
        run_batch(_job(tiny_ckpt, tmp_path / "a.parquet", tmp_path / "out", columns={"query_id": "qid"},
                       evidence={"top_k": 1}), progress=False)


def test_resume_after_a_killed_job_writes_each_pair_once(cluster, tiny_ckpt, tmp_path):
    rows = long_rows(40, 6)
    write_files(pa.table(rows), tmp_path / "in", num_files=4)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "prism_ray.cli", "batch", "--address", cluster, "--model", str(tiny_ckpt),
           "--dtype", "float32", "--input", str(tmp_path / "in"), "--output", str(out), "--pairs-per-file", "12",
           "--scorer-actors", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first_run = len(list(out.glob("part-*.parquet")))
    assert first_run >= 1, "the first run wrote nothing before it was stopped"
    # The rerun goes through the command too, and its summary says what it did.
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    said = dict(line.split(":", 1) for line in rerun.stdout.splitlines() if ":" in line)
    written = int(said["pairs written"].split()[0])
    skipped = int(said["skipped"].split()[0])
    assert skipped > 0 and written < 240 and skipped + written == 240
    assert "rows/s" in said["pairs written"] and "tokens/s" in said["pairs written"]
    assert said["failed rows"].split()[0] == "0" and str(out) in said["output"]
    keys = [(r["query_id"], r["doc_id"]) for r in _read(out).select(["query_id", "doc_id"]).to_pylist()]
    assert len(keys) == len(set(keys)) == 240
    assert set(keys) == set(zip(rows["query_id"], rows["doc_id"]))
    assert (out / "_SUCCESS").is_file() and not list((out / "_tmp").glob("*"))


def test_chunked_batch_reports_the_best_chunk_and_evidence_reads_it(cluster, tiny_ckpt, engine, tmp_path):
    from conftest import english_texts

    long_doc = " ".join(english_texts(4, 80, 160))
    rows = {"query_id": [1, 1, 2], "query": ["What is water?"] * 2 + ["How do generators work?"],
            "doc_id": [10, 11, 12], "text": [long_doc, "Water boils at 100 C.", long_doc[500:]]}
    inp = write_files(pa.table(rows), tmp_path / "in", num_files=1)
    run_batch(_job(tiny_ckpt, inp, tmp_path / "out", chunking={"max_chunks_per_doc": 3, "chunk_tokens": 100},
                   evidence={"top_k": 1, "max_new_tokens": 4}), progress=False)
    out = _by_key(_read(tmp_path / "out"))
    assert {"chunk_index", "chunk_count", "chunk_start", "chunk_end"} <= set(next(iter(out.values())))
    short = out[(1, 11)]
    assert (short["chunk_index"], short["chunk_count"], short["chunk_start"], short["chunk_end"]) == (0, 1, 0, 21)
    for (_, did), r in out.items():
        text = rows["text"][rows["doc_id"].index(did)]
        query = rows["query"][rows["doc_id"].index(did)]
        alone = engine.score_pairs(query, [text[r["chunk_start"]:r["chunk_end"]]])[0].score
        assert abs(r["score"] - alone) <= TOL
    assert out[(1, 10)]["chunk_count"] == 3 and out[(1, 10)]["truncated"]
    evidence = EvidenceEngine(tiny_ckpt, dtype="float32")
    top = next(r for (qid, _), r in out.items() if qid == 2)  # one document: it gets evidence, for its best chunk
    text = rows["text"][2][top["chunk_start"]:top["chunk_end"]]
    assert top["generation"] == evidence.generate([(rows["query"][2], text)], max_new_tokens=4)[0].text
