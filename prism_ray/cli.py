"""The `prism-ray` command: build test checkpoints, rerank from the shell, run the demo.

Errors a user can fix (missing model dir, unreadable file, bad input) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from prism_ray import checkpoints
from prism_ray.prompt import CARD_DOCUMENTS, CARD_QUERY

if TYPE_CHECKING:  # imported where used: `prism-ray --help` stays fast
    from prism_ray.batch.config import BatchConfig


class UsageError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


def _read_docs_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read --docs-file {path}: {exc.strerror or exc}") from None
    docs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--docs-file {path} line {n}: not JSON ({exc.msg})") from None
        if isinstance(item, dict):
            item = item.get("text")
        if not isinstance(item, str):
            raise UsageError(f"--docs-file {path} line {n}: expected a JSON string or an object with a string 'text'")
        docs.append(item)
    return docs


def rerank(model: str, query: str, docs: list[str], evidence: bool, max_new_tokens: int,
           dtype: str = "auto", max_length: int | None = None, chunking: dict | None = None) -> dict:
    """Rank `docs` for `query` with `prism_ray.Reranker`; the dict `--json` prints. With `evidence`, every
    document gets contribution/evidence. With `chunking` (max_chunks_per_doc, chunk_tokens, overlap_tokens),
    each document is scored by its best chunk, reported as `chunk`, and evidence is generated for that chunk."""
    from prism_ray.engine.score import validate_group
    from prism_ray.prompt import DEFAULT_MAX_LENGTH
    from prism_ray.reranker import Reranker

    try:
        validate_group(query, docs)
        reranker = Reranker(model, dtype=dtype, max_length=max_length or DEFAULT_MAX_LENGTH)
        ranked = reranker.rank(query, docs, chunking=chunking,
                               evidence={"top_n": len(docs), "max_new_tokens": max_new_tokens} if evidence else None)
    except ValueError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    results = []
    for r in ranked:
        item = {"index": r.index, "relevance_score": r.score, "logit": r.logit, "truncated": r.truncated}
        if r.chunk is not None:
            item["chunk"] = r.chunk
        if r.has_evidence:
            item.update(contribution=r.contribution, evidence=r.evidence, text=r.generated_text,
                        evidence_truncated=r.evidence_truncated)
        results.append(item)
    return {"model": model, "results": results}


def _print_table(out: dict, docs: list[str]) -> None:
    print(f"model: {out['model']}")
    for rank, r in enumerate(out["results"], 1):
        doc = docs[r["index"]].replace("\n", " ")
        flag = " (truncated)" if r["truncated"] else ""
        print(f"{rank:>3}. score={r['relevance_score']:.4f}  logit={r['logit']:+.3f}  doc[{r['index']}]{flag}: {doc[:70]}")
        if "text" in r:
            print(f"     contribution: {r['contribution']}")
            print(f"     evidence:     {r['evidence']}")
            print(f"     raw text:     {r['text'][:160]!r}")


def _is_test_checkpoint(model: str) -> bool:
    return (Path(model) / "prism_checkpoint.json").is_file()


def cmd_rerank(args) -> None:
    docs = list(args.doc or [])
    if args.docs_file:
        docs += _read_docs_file(args.docs_file)
    out = rerank(args.model, args.query, docs, args.evidence, args.max_new_tokens, args.dtype, args.max_length,
                 _chunking_flags(args) or None)
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        _print_table(out, docs)


def cmd_demo(args) -> None:
    print(f"Query: {CARD_QUERY}")
    out = rerank(args.model, CARD_QUERY, CARD_DOCUMENTS, True, args.max_new_tokens, args.dtype)
    _print_table(out, CARD_DOCUMENTS)
    if _is_test_checkpoint(args.model):
        print(
            "\nNote: this is a test checkpoint with RANDOM weights (real architecture and tokenizer): its scores\n"
            "and text are meaningless. For real output point --model at a released checkpoint, e.g.\n"
            "  prism-ray demo --model infgrad/Prism-Qwen3.5-Reranker-0.8B   (needs network access)\n"
            "or at a local directory holding one."
        )


def cmd_checkpoint_build(args) -> None:
    try:
        out = checkpoints.build_checkpoint(args.preset, args.out, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"built preset {args.preset!r} at {out}")


def cmd_checkpoint_list(args) -> None:
    for c in checkpoints.RELEASED:
        print(f"{c.name:<30} {c.hub_id:<40} backbone={c.backbone:<18} params={c.parameters}")
    print("test presets: " + ", ".join(checkpoints.PRESETS))


def validate_serve_config(path: str) -> dict:
    """Load a Serve config file and validate every prism-ray application's args."""
    from prism_ray.config import ConfigFileError, read_serve_config

    try:
        return read_serve_config(path)
    except ConfigFileError as exc:
        raise UsageError(str(exc)) from None


def check_serve_config(path: str) -> list[str]:
    """`serve --check`: a Serve config file, or a RayService manifest's serveConfigV2, validated by Ray's
    Serve schema and each prism-ray app's config; the OK summary, or a UsageError naming the field."""
    from prism_ray.config import ConfigFileError
    from prism_ray.serve_check import check

    try:
        return check(path).summary()
    except ConfigFileError as exc:
        raise UsageError(str(exc)) from None


DIRECT_INGRESS = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
THROUGHPUT_OPTIMIZED = "RAY_SERVE_THROUGHPUT_OPTIMIZED"


def serve_environment(environ: dict[str, str], direct_ingress: bool = False,
                      throughput_optimized: bool = False, proxy_limits: dict | None = None) -> dict[str, str]:
    """The environment `serve run` starts its local cluster with. With `direct_ingress`, Serve's direct
    ingress is on: each router replica also serves HTTP itself, on its own port, with no proxy between the
    client and the router (the proxy at the config's port stays). `throughput_optimized` is Serve's
    throughput mode, which includes direct ingress: replicas also call each other over gRPC, and each runs
    its request handlers on its own event loop rather than a thread beside it (one hop less per tier call).
    The variables are read by every Serve process when it starts, so they only reach a cluster that
    `serve run` starts here; a running cluster (`ray start`, KubeRay) takes them from its own environment.
    With `proxy_limits` (route prefix -> that application's `LimitsConfig`), Serve's proxy runs the body
    guard (`prism_ray.proxy_guard`): a body past its application's limits is refused in the proxy, before
    the router sees it and with nothing past the limit read. A proxy callback the caller has set already
    is kept, and the guard left out."""
    env = dict(environ)
    if proxy_limits is not None:
        from prism_ray.proxy_guard import CALLBACK, CALLBACK_VARIABLE, proxy_environment

        if env.get(CALLBACK_VARIABLE, CALLBACK) == CALLBACK:
            env.update(proxy_environment(proxy_limits))
        else:
            print(f"prism-ray serve: {CALLBACK_VARIABLE} is set to {env[CALLBACK_VARIABLE]!r}, so Serve's proxy "
                  f"runs that and not prism-ray's body guard; the proxy reads bodies past max_body_bytes "
                  f"ahead of the router, before it refuses them", file=sys.stderr)
    chosen = [var for var, on in ((THROUGHPUT_OPTIMIZED, throughput_optimized), (DIRECT_INGRESS, direct_ingress))
              if on]
    for var in chosen:
        env[var] = "1"
    if chosen and env.get("RAY_ADDRESS"):
        print(f"prism-ray serve: RAY_ADDRESS is set, so `serve run` joins that cluster, whose processes read "
              f"{' and '.join(chosen)} from where it was started, not from here", file=sys.stderr)
    if throughput_optimized:
        print("prism-ray serve: Serve's throughput mode on: replicas call each other over gRPC and run their "
              "handlers on their own event loops", file=sys.stderr)
    if chosen:
        print(f"prism-ray serve: direct ingress on: each router replica also serves HTTP on its own port, from "
              f"{env.get('RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT', '30000')} up, one per replica; the list is the "
              f"`target_groups` of the dashboard's /api/serve/applications/",
              file=sys.stderr)
    return env


def cmd_serve(args) -> None:
    """Validate the config, then hand it to Ray's own `serve run` (blocks until Ctrl-C)."""
    import os
    import shutil

    if args.check:
        print("\n".join(check_serve_config(args.config)))
        return
    validate_serve_config(args.config)
    from prism_ray.config import serve_config_limits

    limits = None if args.no_proxy_guard else serve_config_limits(args.config)
    serve_bin = shutil.which("serve") or str(Path(sys.executable).with_name("serve"))
    os.execve(serve_bin, [serve_bin, "run", args.config, *(["--non-blocking"] if args.non_blocking else [])],
              serve_environment(os.environ, args.direct_ingress, args.throughput_optimized, limits))


LOCAL_SERVE_CONFIG = "deployments/local.yaml"


def batch_config_from_args(args) -> BatchConfig:
    """Flags over the optional --config file; a bad value names its field, exit 2."""
    from prism_ray.batch.config import BatchConfig
    from prism_ray.config import ConfigFileError, find_model, read_yaml, serve_config_models, validated

    flags = {k: v for k, v in {
        "input": args.input, "output": args.output, "model": args.model, "serve_config": args.serve_config,
        "dtype": args.dtype, "layout": args.layout, "serve_app": args.serve_app,
        "pairs_per_file": args.pairs_per_file, "overwrite": args.overwrite or None,
        "scorer_actors": _actor_range(args.scorer_actors, "--scorer-actors"),
        "evidence_actors": _actor_range(args.evidence_actors, "--evidence-actors"),
    }.items() if v is not None}
    columns = {k: getattr(args, f"{k}_column") for k in ("query_id", "query", "doc_id", "text", "documents", "doc_ids")
               if getattr(args, f"{k}_column") is not None}
    evidence = {k: v for k, v in {"top_k": args.evidence_top_k, "min_score": args.evidence_min_score,
                                  "max_new_tokens": args.max_new_tokens}.items() if v is not None}
    chunking = _chunking_flags(args)
    try:
        data = (read_yaml(args.config) or {}) if args.config else {}
        if not isinstance(data, dict):
            raise UsageError(f"{args.config}: expected a mapping of job settings")
        data.update(flags)
        if columns:
            data["columns"] = {**data.get("columns", {}), **columns}
        if evidence:
            data["evidence"] = {**(data.get("evidence") or {}), **evidence}
        if chunking:
            data["chunking"] = {**(data.get("chunking") or {}), **chunking}
        model = data.get("model")
        if (model and not data.get("serve_config") and not Path(model).exists()
                and Path(LOCAL_SERVE_CONFIG).is_file()):
            if find_model(serve_config_models(LOCAL_SERVE_CONFIG), model):
                data["serve_config"] = LOCAL_SERVE_CONFIG
        return validated(BatchConfig, data, args.config or "batch")
    except ConfigFileError as exc:
        raise UsageError(str(exc)) from None


def _chunking_flags(args) -> dict:
    return {k: v for k, v in {"max_chunks_per_doc": args.max_chunks_per_doc, "chunk_tokens": args.chunk_tokens,
                              "overlap_tokens": args.overlap_tokens}.items() if v is not None}


def _add_chunking_flags(parser) -> None:
    parser.add_argument("--max-chunks-per-doc", type=int, default=None, metavar="N",
                        help="read long documents whole: cut each into at most N chunks, score it by its best")
    parser.add_argument("--chunk-tokens", type=int, default=None, metavar="T",
                        help="tokens per chunk (default and cap: what fits --max-length with the prompt)")
    parser.add_argument("--overlap-tokens", type=int, default=None, metavar="O", help="tokens chunks share (32)")


def _actor_range(value: str | None, flag: str) -> dict | None:
    if value is None:
        return None
    try:
        lo, _, hi = value.partition(":")
        return {"min": int(lo), "max": int(hi or lo)}
    except ValueError:
        raise UsageError(f"{flag} must be N or MIN:MAX, not {value!r}") from None


def cmd_batch(args) -> None:
    import ray

    from prism_ray.batch import run_batch
    from prism_ray.batch.store import OutputMismatch
    from prism_ray.config import ConfigFileError
    from prism_ray.data.rows import InputError

    cfg = batch_config_from_args(args)
    try:
        cfg.resolve_model()  # a config mistake is reported before a cluster starts
        ray.init(address=args.address, log_to_driver=False)
        import ray.data  # configures its loggers on import; quiet them after that

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # our progress bar and summary say enough
        summary = run_batch(cfg, progress=not args.no_progress)
    except (InputError, OutputMismatch, ConfigFileError) as exc:
        raise UsageError(str(exc)) from None
    print("\n".join(summary.lines()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prism-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("rerank", help="rank documents for a query")
    r.add_argument("--model", required=True, help="local checkpoint dir or hub id")
    r.add_argument("--query", required=True)
    r.add_argument("--doc", action="append", help="a document (repeatable)")
    r.add_argument("--docs-file", help="JSON lines: a string or {\"text\": ...} per line")
    r.add_argument("--evidence", action="store_true", help="also generate contribution and evidence")
    r.add_argument("--max-new-tokens", type=int, default=512)
    r.add_argument("--max-length", type=int, default=None, help="token budget of the whole prompt")
    r.add_argument("--dtype", default="auto")
    r.add_argument("--json", action="store_true")
    _add_chunking_flags(r)
    r.set_defaults(func=cmd_rerank)

    d = sub.add_parser("demo", help="rerank the model card's example with evidence")
    d.add_argument("--model", required=True)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--dtype", default="auto")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="run a Serve config file (validated first), like `serve run`")
    s.add_argument("config", help="e.g. deployments/local.yaml")
    s.add_argument("--non-blocking", action="store_true")
    s.add_argument("--direct-ingress", action="store_true",
                   help="Serve's direct ingress: router replicas also serve HTTP on their own ports (from 30000), "
                        "no proxy in the way (one-document path 16 -> 9 ms; memory bounded under hostile bodies)")
    s.add_argument("--throughput-optimized", action="store_true",
                   help="Serve's throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1): direct ingress, and replicas "
                        "call each other over gRPC (one-document path direct 7.7 -> 5.9 ms)")
    s.add_argument("--no-proxy-guard", action="store_true",
                   help="leave Serve's proxy without prism-ray's body guard (it then reads bodies ahead of the "
                        "router, past the limit, before the router can refuse them); for comparisons")
    s.add_argument("--check", action="store_true", help="only validate CONFIG (a Serve config file or a KubeRay "
                                                          "RayService manifest) and exit: 0 if valid, 2 naming the field")
    s.set_defaults(func=cmd_serve)

    bt = sub.add_parser("batch", help="rerank a parquet dataset on Ray Data",
                        description="Rerank a parquet dataset of (query, document) pairs on Ray Data. Flags override "
                                    "--config. A rerun with the same --output resumes where the last one stopped.")
    bt.add_argument("--config", help="job YAML (see jobs/example.yaml)")
    bt.add_argument("--input", help="parquet file or directory (local, s3://, gs://, hdfs://, ...)")
    bt.add_argument("--output", help="output directory")
    bt.add_argument("--model", help="a model name/size from --serve-config (default: deployments/local.yaml when it "
                                    "has that name), a local checkpoint dir, or a hub id")
    bt.add_argument("--serve-config", help="Serve config file whose model settings and resources to reuse")
    bt.add_argument("--dtype", default=None)
    bt.add_argument("--layout", choices=["auto", "long", "wide"], default=None)
    for col in ("query-id", "query", "doc-id", "text", "documents", "doc-ids"):
        bt.add_argument(f"--{col}-column", default=None, metavar="NAME")
    bt.add_argument("--evidence-top-k", type=int, default=None, help="contribution/evidence for each query's top k")
    bt.add_argument("--evidence-min-score", type=float, default=None)
    bt.add_argument("--max-new-tokens", type=int, default=None)
    _add_chunking_flags(bt)
    bt.add_argument("--scorer-actors", default=None, metavar="N|MIN:MAX")
    bt.add_argument("--evidence-actors", default=None, metavar="N|MIN:MAX")
    bt.add_argument("--serve-app", default=None, metavar="NAME", help="use a running Serve app's deployments")
    bt.add_argument("--pairs-per-file", type=int, default=None)
    bt.add_argument("--overwrite", action="store_true", help="replace the output instead of resuming it")
    bt.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    bt.add_argument("--no-progress", action="store_true")
    bt.set_defaults(func=cmd_batch)

    c = sub.add_parser("checkpoint", help="released checkpoints and offline test checkpoints")
    csub = c.add_subparsers(dest="checkpoint_command", required=True)
    b = csub.add_parser("build", help="write an offline test checkpoint")
    b.add_argument("--preset", required=True, choices=sorted(checkpoints.PRESETS))
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_checkpoint_build)
    ls = csub.add_parser("list", help="the released checkpoints")
    ls.set_defaults(func=cmd_checkpoint_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from prism_ray.engine import ModelLoadError
    from prism_ray.prompt import PromptTooLong

    try:
        args.func(args)
    except (UsageError, ModelLoadError, PromptTooLong) as exc:
        print(f"prism-ray: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
