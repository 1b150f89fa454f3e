"""The README's main job: start the local Serve app, rerank the model card's example over HTTP
(with evidence), print the ranking, shut down.

    python -m deployments.demo [deployments/local.yaml] [--port 8000]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

import httpx

from prism_ray.prompt import CARD_DOCUMENTS, CARD_QUERY


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="deployments/local.yaml")
    ap.add_argument("--port", type=int, default=None, help="default: the config's port, or a free one")
    args = ap.parse_args()

    import ray
    from ray import serve

    from deployments.app import build_app
    from prism_ray.cli import UsageError, validate_serve_config

    try:
        doc = validate_serve_config(args.config)
    except UsageError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    application = doc["applications"][0]
    port = args.port or doc.get("http_options", {}).get("port", 8000)
    if not _port_free(port):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    print(f"starting the Serve app from {args.config} on 127.0.0.1:{port} "
          "(first run builds the test checkpoints) ...", flush=True)
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(application["args"]), name=application.get("name", "prism"), route_prefix="/")
        body = {"query": CARD_QUERY, "documents": CARD_DOCUMENTS, "evidence": {"top_n": 2, "max_new_tokens": 48}}
        print(f"POST http://127.0.0.1:{port}/v2/rerank\n{json.dumps(body)[:160]}...\n")
        resp = httpx.post(f"http://127.0.0.1:{port}/v2/rerank", json=body, timeout=300)
        resp.raise_for_status()
        out = resp.json()
        model = application["args"].get("default_model") or application["args"]["models"][0]["name"]
        print(f"model: {model}   query: {CARD_QUERY}")
        for rank, r in enumerate(out["results"], 1):
            print(f"{rank:>3}. score={r['relevance_score']:.4f}  doc[{r['index']}]: {CARD_DOCUMENTS[r['index']][:70]}")
            print(f"     contribution: {r.get('contribution')}")
            print(f"     evidence:     {r.get('evidence')}")
            print(f"     raw text:     {r.get('generated_text', '')[:120]!r}")
        print("\nNote: the local config serves test checkpoints with RANDOM weights (real architecture and\n"
              "tokenizer): scores and text are meaningless. For real output set a model's `model:` to\n"
              "infgrad/Prism-Qwen3.5-Reranker-0.8B (needs network access) or to a local checkpoint directory.")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
