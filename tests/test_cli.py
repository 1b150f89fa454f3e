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


def test_rerank_json_sorted_and_equal_to_engine(tiny_ckpt, tmp_path):
    docs_file = tmp_path / "docs.jsonl"
    docs_file.write_text(json.dumps({"text": "Mount Everest is high."}) + "\n" + json.dumps("沸点是100度") + "\n")
    out = json.loads(run("rerank", "--model", str(tiny_ckpt), "--query", QUERY, "--doc", "Water boils at 100 C.",
                         "--docs-file", str(docs_file), "--json", check_rc=0).stdout)
    assert out["model"] == str(tiny_ckpt)
    scores = [r["relevance_score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r["index"] for r in out["results"]) == [0, 1, 2]
    assert set(out["results"][0]) == {"index", "relevance_score", "logit", "truncated"}
    engine = ScoreEngine(tiny_ckpt).score_pairs(QUERY, ["Water boils at 100 C.", "Mount Everest is high.", "沸点是100度"])
    for r in out["results"]:
        assert abs(r["relevance_score"] - engine[r["index"]].score) <= 1e-6


def test_rerank_with_evidence(tiny_ckpt):
    out = json.loads(run("rerank", "--model", str(tiny_ckpt), "--query", QUERY, "--doc", "a", "--doc", "b",
                         "--evidence", "--max-new-tokens", "5", "--json", check_rc=0).stdout)
    for r in out["results"]:
        assert {"contribution", "evidence", "text"} <= set(r)
        assert isinstance(r["text"], str) and r["text"]


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


def test_bad_docs_file_line(tiny_ckpt, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('"ok"\n{"text": 5}\n')
    proc = run("rerank", "--model", str(tiny_ckpt), "--query", "q", "--docs-file", str(f))
    assert proc.returncode == 2 and "line 2" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_says_weights_are_random(tiny_ckpt):
    proc = run("demo", "--model", str(tiny_ckpt), "--max-new-tokens", "4", check_rc=0)
    assert "RANDOM weights" in proc.stdout
    assert "infgrad/Prism-Qwen3.5-Reranker-0.8B" in proc.stdout
    assert proc.stdout.count("score=") == 2
