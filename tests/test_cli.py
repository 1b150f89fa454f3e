"""The `prism-ray` command as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prism_ray.engine import ScoreEngine

QUERY = "What is the boiling point of water at sea level?"


def run(*args, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "prism_ray.cli", *args], capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


@pytest.mark.slow  # the CLI in a subprocess
def test_rerank_json_sorted_and_equal_to_engine(tiny_ckpt, tmp_path):
    docs_file = tmp_path / "docs.jsonl"
    docs_file.write_text(json.dumps({"text": "Mount Everest is high."}) + "\n" + json.dumps("沸点是100度") + "\n")
    out = json.loads(run("rerank", "--model", str(tiny_ckpt), "--query", QUERY, "--doc", "Water boils at 100 C.",
                         "--docs-file", str(docs_file), "--dtype", "float32", "--json", check_rc=0).stdout)
    assert out["model"] == str(tiny_ckpt)
    scores = [r["relevance_score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r["index"] for r in out["results"]) == [0, 1, 2]
    assert set(out["results"][0]) == {"index", "relevance_score", "logit", "truncated"}
    engine = ScoreEngine(tiny_ckpt, dtype="float32").score_pairs(
        QUERY, ["Water boils at 100 C.", "Mount Everest is high.", "沸点是100度"])
    for r in out["results"]:
        assert abs(r["relevance_score"] - engine[r["index"]].score) <= 1e-6


@pytest.mark.slow  # the CLI in a subprocess
def test_rerank_with_evidence(tiny_ckpt):
    out = json.loads(run("rerank", "--model", str(tiny_ckpt), "--query", QUERY, "--doc", "a", "--doc", "b",
                         "--evidence", "--max-new-tokens", "5", "--json", check_rc=0).stdout)
    for r in out["results"]:
        assert {"contribution", "evidence", "text"} <= set(r)
        assert isinstance(r["text"], str) and r["text"]


@pytest.mark.slow  # the CLI in a subprocess
@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/dir", "--query", "q", "--doc", "d"], "model directory '/no/such/dir' not found"),
    (["--query", " ", "--doc", "d"], "query must be a non-empty string"),
    (["--query", "q"], "documents must hold at least one document"),
    (["--query", "q", "--docs-file", "/no/such.jsonl"], "cannot read --docs-file"),
])
def test_errors_are_one_line_and_exit_2(tiny_ckpt, args, message):
    if "--model" not in args:
        args = ["--model", str(tiny_ckpt), *args]
    proc = run("rerank", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # the CLI in a subprocess
def test_bad_docs_file_line(tiny_ckpt, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('"ok"\n{"text": 5}\n')
    proc = run("rerank", "--model", str(tiny_ckpt), "--query", "q", "--docs-file", str(f))
    assert proc.returncode == 2 and "line 2" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # the CLI in a subprocess
def test_demo_says_weights_are_random(tiny_ckpt):
    proc = run("demo", "--model", str(tiny_ckpt), "--max-new-tokens", "4", check_rc=0)
    assert "RANDOM weights" in proc.stdout
    assert "infgrad/Prism-Qwen3.5-Reranker-0.8B" in proc.stdout
    assert proc.stdout.count("score=") == 2


def _batch_args(*args):
    from prism_ray.cli import build_parser

    return build_parser().parse_args(["batch", *args])


def test_batch_flags_override_the_job_file_and_reuse_the_serve_config(monkeypatch):
    from pathlib import Path

    from prism_ray.cli import batch_config_from_args

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    cfg = batch_config_from_args(_batch_args("--config", "jobs/example.yaml", "--output", "/tmp/elsewhere",
                                             "--evidence-top-k", "5", "--query-column", "question"))
    assert cfg.output == "/tmp/elsewhere" and cfg.input == "data/pairs/"
    assert cfg.evidence.top_k == 5 and cfg.evidence.max_new_tokens == 128
    assert cfg.columns.query == "question" and cfg.columns.text == "text"
    model = cfg.resolve_model()
    assert model.name == "prism-tiny" and model.scorer.ray_actor_options == {"num_cpus": 0.25}
    assert cfg.scorer_actors.resolve(model.scorer) == (1, 2)
    # Without --config or --serve-config, a model name is looked up in deployments/local.yaml.
    plain = batch_config_from_args(_batch_args("--model", "0.8b", "--input", "in/", "--output", "out/"))
    assert plain.serve_config == "deployments/local.yaml" and plain.resolve_model().name == "prism-tiny"
    assert plain.scorer_actors.resolve(plain.resolve_model().scorer) == (1, 2)
    assert plain.evidence is None


@pytest.mark.slow  # the CLI in a subprocess
@pytest.mark.parametrize("args, message", [
    (["--input", "in/", "--model", "m"], "batch.output: Field required"),
    (["--input", "in/", "--output", "o/", "--model", "m", "--scorer-actors", "two"], "--scorer-actors must be N or MIN:MAX"),
    (["--input", "in/", "--output", "o/", "--model", "m", "--evidence-top-k", "0"], "batch.evidence.top_k: Input should be greater than or equal to 1"),
    (["--config", "nope.yaml"], "cannot read nope.yaml"),
    (["--input", "in/", "--output", "o/", "--model", "huge", "--serve-config", "deployments/local.yaml"], "model 'huge' is not in deployments/local.yaml"),
])
def test_batch_mistakes_are_one_line_and_exit_2(args, message):
    proc = run("batch", *args, "--no-progress")
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow  # the CLI in a subprocess
def test_rerank_chunked_reports_the_best_chunk_whose_span_scores_the_same(tiny_ckpt):
    from conftest import english_texts

    long_doc = " ".join(english_texts(6, 80, 160))
    docs = [long_doc, "Water boils at 100 C."]
    argv = ["rerank", "--model", str(tiny_ckpt), "--query", QUERY, "--doc", docs[0], "--doc", docs[1], "--dtype",
            "float32", "--max-length", "512", "--json"]
    plain = json.loads(run(*argv, check_rc=0).stdout)
    assert all("chunk" not in r for r in plain["results"])  # without chunking, no chunk key anywhere
    out = json.loads(run(*argv, "--max-chunks-per-doc", "4", "--chunk-tokens", "120", check_rc=0).stdout)
    by_index = {r["index"]: r for r in out["results"]}
    engine = ScoreEngine(tiny_ckpt, dtype="float32", max_length=512)
    assert by_index[0]["chunk"]["count"] == 4 and by_index[0]["truncated"]
    assert by_index[1]["chunk"] == {"index": 0, "count": 1, "start": 0, "end": len(docs[1])}
    for i, doc in enumerate(docs):
        c = by_index[i]["chunk"]
        alone = engine.score_pairs(QUERY, [doc[c["start"]:c["end"]]])[0].score
        assert abs(by_index[i]["relevance_score"] - alone) <= 1e-5


GUARD = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "prism_ray.proxy_guard:middlewares"}


def _local_max_body_bytes() -> int:
    """local.yaml's own max_body_bytes, which the proxy's guard should take."""
    import yaml

    (app,) = yaml.safe_load(open("deployments/local.yaml"))["applications"]
    return app["args"]["limits"]["max_body_bytes"]


@pytest.mark.parametrize("flags, expected", [
    ([], GUARD),
    (["--direct-ingress"], {**GUARD, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}),
    (["--throughput-optimized"], {**GUARD, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}),
    (["--no-proxy-guard"], {}),
])
def test_serve_hands_the_config_to_serve_run_with_serves_modes_only_when_asked(monkeypatch, capsys, flags, expected):
    """`prism-ray serve` becomes `serve run CONFIG`, with Serve's proxy running the body guard under the
    config's limits (unless `--no-proxy-guard`); `--direct-ingress` / `--throughput-optimized` turn Serve's
    direct ingress / throughput mode (which includes direct ingress) on in the environment the cluster it
    starts reads (and say where the routers listen), and nothing else changes."""
    import json
    import os

    from prism_ray.cli import main

    for var in ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_ADDRESS",
                "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "PRISM_RAY_PROXY_LIMITS"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((argv, env)))
    main(["serve", "deployments/local.yaml", *flags])
    (argv, env), = calls
    assert argv[1:] == ["run", "deployments/local.yaml"]
    limits = json.loads(env.pop("PRISM_RAY_PROXY_LIMITS"))["/"] if expected else {}
    assert {k: v for k, v in env.items() if os.environ.get(k) != v} == expected
    assert set(os.environ) <= set(env)
    assert limits.get("max_body_bytes") == (_local_max_body_bytes() if expected else None)
    err = capsys.readouterr().err
    flag = flags[0] if flags and flags[0] != "--no-proxy-guard" else None
    assert ("direct ingress on" in err) == (flag is not None)
    assert ("throughput mode on" in err) == (flag == "--throughput-optimized")


def test_serve_keeps_a_proxy_callback_the_caller_set_and_says_the_guard_is_off(monkeypatch, capsys):
    import os

    from prism_ray.cli import main

    monkeypatch.setenv("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "mine.proxy:middlewares")
    monkeypatch.delenv("PRISM_RAY_PROXY_LIMITS", raising=False)
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((argv, env)))
    main(["serve", "deployments/local.yaml"])
    (_, env), = calls
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "mine.proxy:middlewares"
    assert "PRISM_RAY_PROXY_LIMITS" not in env
    assert "not prism-ray's body guard" in capsys.readouterr().err
