"""The `prism-ray` command: build test checkpoints, rerank from the shell, run the demo.

Errors a user can fix (missing model dir, unreadable file, bad input) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prism_ray import checkpoints
from prism_ray.prompt import CARD_DOCUMENTS, CARD_QUERY



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
           dtype: str = "auto", max_length: int | None = None) -> dict:
    """Rank `docs` for `query`; the dict `--json` prints."""
    from prism_ray.engine import EvidenceEngine, ScoreEngine, load_model
    from prism_ray.engine.score import validate_group
    from prism_ray.prompt import DEFAULT_MAX_LENGTH

    try:
        validate_group(query, docs)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    loaded = load_model(model, dtype=dtype, max_length=max_length or DEFAULT_MAX_LENGTH)
    results = []
    if evidence:
        for i, r in enumerate(EvidenceEngine(loaded).generate([(query, d) for d in docs], max_new_tokens)):
            results.append({"index": i, "relevance_score": r.score, "logit": r.logit, "truncated": r.prompt_truncated,
                            "contribution": r.contribution, "evidence": r.evidence, "text": r.text,
                            "evidence_truncated": r.truncated})
    else:
        for i, r in enumerate(ScoreEngine(loaded).score_pairs(query, docs)):
            results.append({"index": i, "relevance_score": r.score, "logit": r.logit, "truncated": r.truncated})
    results.sort(key=lambda r: -r["relevance_score"])
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
    out = rerank(args.model, args.query, docs, args.evidence, args.max_new_tokens, args.dtype, args.max_length)
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
    import yaml
    from pydantic import ValidationError

    from prism_ray.config import AppConfig

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML: {exc}".splitlines()[0]) from None
    apps = (doc or {}).get("applications") if isinstance(doc, dict) else None
    if not apps:
        raise UsageError(f"{path}: no 'applications' list; expected a Serve config file")
    for i, application in enumerate(apps):
        if str(application.get("import_path", "")).startswith("deployments.app:"):
            try:
                AppConfig.model_validate(application.get("args") or {})
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"])
                raise UsageError(f"{path}: applications.{i}.args.{field}: {first['msg']}") from None
    return doc


def cmd_serve(args) -> None:
    """Validate the config, then hand it to Ray's own `serve run` (blocks until Ctrl-C)."""
    import os
    import shutil

    validate_serve_config(args.config)
    serve_bin = shutil.which("serve") or str(Path(sys.executable).with_name("serve"))
    os.execv(serve_bin, [serve_bin, "run", args.config, *(["--non-blocking"] if args.non_blocking else [])])


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
    r.set_defaults(func=cmd_rerank)

    d = sub.add_parser("demo", help="rerank the model card's example with evidence")
    d.add_argument("--model", required=True)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--dtype", default="auto")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="run a Serve config file (validated first), like `serve run`")
    s.add_argument("config", help="e.g. deployments/local.yaml")
    s.add_argument("--non-blocking", action="store_true")
    s.set_defaults(func=cmd_serve)

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
