"""Batch on several nodes: a head and two worker nodes on this machine. The processor's actors spread over
the nodes, and a batch job survives losing a worker node."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_data import long_rows, write_files

from prism_ray.batch import BatchConfig, run_batch

pytestmark = pytest.mark.cluster  # starts a Ray cluster


@pytest.fixture(scope="module")
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster

    store = 96 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": store})
    workers = [cluster.add_node(num_cpus=3, object_store_memory=store) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def _scorer_nodes() -> set[str]:
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if "ScoreActor" in (a.class_name or "")}


def _score_actors() -> dict[str, str]:
    """Every scorer actor the cluster has run (alive or not): actor id -> node id."""
    from ray.util.state import list_actors

    return {a.actor_id: a.node_id for a in list_actors(limit=1000) if "ScoreActor" in (a.class_name or "")}


def test_the_processors_actors_spread_over_the_nodes(three_nodes, tiny_ckpt):
    import ray

    from prism_ray.data import build_processor

    _, workers = three_nodes
    before = _score_actors()
    items = [{"query": f"question {i}", "documents": [f"answer {i}", "something else"]} for i in range(16)]
    # Two actors of 2 CPUs each on workers of 3 CPUs (the head has none): one per node.
    rerank = build_processor({"model": str(tiny_ckpt), "dtype": "float32", "concurrency": 2, "num_cpus": 2,
                              "batch_size": 1})
    out = rerank(ray.data.from_items(items).repartition(16)).take_all()
    assert len(out) == 16 and all(r["error"] is None and len(r["scores"]) == 2 for r in out)
    ran = {a: n for a, n in _score_actors().items() if a not in before}
    assert len(ran) == 2 and set(ran.values()) == {w.node_id for w in workers}


def test_job_finishes_with_every_pair_once_after_a_worker_node_is_removed(three_nodes, tiny_ckpt, tmp_path):
    cluster, workers = three_nodes
    rows = long_rows(48, 8)
    write_files(pa.table(rows), tmp_path / "in", num_files=4)
    out = tmp_path / "out"
    cfg = BatchConfig(input=str(tmp_path / "in"), output=str(out), model=str(tiny_ckpt), dtype="float32",
                      pairs_per_file=16, scorer_actors={"min": 2, "max": 2})
    result: dict = {}

    def run():
        try:
            result["summary"] = run_batch(cfg, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    job = threading.Thread(target=run, daemon=True)
    job.start()
    deadline = time.monotonic() + 240
    while not list(out.glob("part-*.parquet")) and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.is_alive(), f"the job ended before a node could be removed: {result}"
    busy = _scorer_nodes()
    victim = next((w for w in workers if w.node_id in busy), None)
    assert victim is not None, "no scorer actor is running on a worker node"
    written_before = len(list(out.glob("part-*.parquet")))
    cluster.remove_node(victim)
    job.join(timeout=420)
    assert not job.is_alive(), "the job did not finish after losing a node"
    assert "error" not in result, result.get("error")
    assert written_before < 48, "every bucket was written before the node went away"
    keys = [(r["query_id"], r["doc_id"]) for r in pq.read_table(out).select(["query_id", "doc_id"]).to_pylist()]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(zip(rows["query_id"], rows["doc_id"]))
