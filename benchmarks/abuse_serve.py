"""Hostile clients beside normal ones, on loopback: are normal requests still served, and is every hostile one
refused (or, for a long document, served at the cost of what is read) without a replica growing or dying?

    python benchmarks/abuse_serve.py [--seconds 60] [--baseline-seconds 30] [--normal 4] [--hostile 8] [--direct]
                                     [--no-proxy-guard]

Runs the config's application (default `deployments/local.yaml`) on a fresh local Ray cluster, on 127.0.0.1
only (through Serve's proxy, which runs prism-ray's body guard as under `prism-ray serve`; with `--direct`,
straight to the router replica under Serve's direct ingress).
Two phases in this one run: `--normal` clients alone for `--baseline-seconds` (the baseline), then the
same clients for `--seconds` beside `--hostile` clients, each cycling through:

- `chunked`: a 64 MiB body sent chunked (no Content-Length) as fast as it goes (expected 413);
- `trickle`: a chunked body of one byte every 0.2 s, for up to 40 s (expected 408 at body_timeout_s);
- `nested`: `{"query": ..., "documents": [[[[...]]]]}` 100,000 levels deep (expected 422);
- `long-doc`: one document of 15 M characters (~2.5 M words; served: 200, reading only what fits max_length);
- `long-doc-chunked`: the same with `"chunking": {"max_chunks_per_doc": 64}` (200; 413 where its 64 chunks
  x their size pass the config's `limits.max_chunk_tokens_per_request`, as at the room under local.yaml).

Hostile requests go over raw sockets, so a refusal that closes the connection mid-body is still read. It
prints the normal clients' p50/p99 and statuses for both phases, every hostile request's status and time
(grouped by kind), the cores each process kept busy in each phase, and each Serve replica's and proxy's resident memory (VmRSS) at the start and the end of
the hostile phase. Exit 1 when a target is missed: a normal request not 200, a normal p99 over 2x the
baseline's, a hostile request with another status than its kind expects, a replica restarted, or a process
grown more than 200 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import ingress_ports  # noqa: E402  (benchmarks/, on sys.path as the script's folder)
from soak_serve import percentile, serve_processes  # noqa: E402

from prism_ray.cli import serve_environment  # noqa: E402
from prism_ray.config import LimitsConfig  # noqa: E402

QUERY = "What is the boiling point of water at sea level?"
EXPECTED = {"chunked": {413}, "trickle": {408}, "nested": {422}, "long-doc": {200}, "long-doc-chunked": {200}}
MAX_GROWTH_MIB = 200


def _words(chars: int, seed: int = 0) -> str:
    """Seeded words of Python's docs, about `chars` characters of them."""
    import pydoc_data.topics

    vocab = sorted({w for t in pydoc_data.topics.topics.values() for w in t.split() if len(w) < 12})
    rng = random.Random(seed)
    words = rng.choices(vocab, k=chars // 6)
    text = " ".join(words)
    while len(text) < chars:
        text += " " + rng.choice(vocab)
    return text[:chars]


def _cpu_seconds(pid: int | str) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_now() -> dict[str, float]:
    """CPU seconds so far of each Serve process, this benchmark's own (its clients), and the machine's busy
    total (all cores, from /proc/stat)."""
    out = {"(this benchmark: the clients)": _cpu_seconds("self")}
    for name, (pid, _) in serve_processes(proxies=True).items():
        try:
            out[name] = _cpu_seconds(pid)
        except OSError:
            pass
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    out["(machine, all processes)"] = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    out["(wall)"] = time.monotonic()
    return out


def _print_cpu(cpu: list[dict[str, float]]) -> None:
    """Cores each process kept busy in each phase: where the machine's time went."""
    print(f"\nCPU (cores busy on average; the machine has {os.cpu_count()}): baseline -> hostile phase")
    for name in sorted(cpu[0]):
        if name != "(wall)" and all(name in c for c in cpu):
            base, hostile = ((b[name] - a[name]) / (b["(wall)"] - a["(wall)"]) for a, b in zip(cpu, cpu[1:]))
            print(f"  {name:40s} {base:5.2f} -> {hostile:5.2f}")


def _server_timing(header: str) -> dict[str, float]:
    """`scorer;dur=12.5, router;dur=3.1` as {"scorer": 12.5, "router": 3.1}."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def _print_split(rows: list[tuple[float, dict[str, float]]]) -> None:
    """Where a normal request's time went (p50 / p99 of each part, ms): the scorer's compute (its engine
    call, which other requests' rows share), the router's own work, and the rest (the proxy, the hops,
    the scorer's queue): tells a slower scorer from a busier path."""
    if not rows:
        return
    parts = {"scorer compute": [t["scorer"] for _, t in rows], "router own": [t["router"] for _, t in rows],
             "rest (proxy, hops, queue)": [ms - t["scorer"] - t["router"] for ms, t in rows]}
    print("           " + ", ".join(f"{name} {statistics.median(v):.0f} / {percentile(v, 0.99):.0f}"
                                    for name, v in parts.items()))


def _normal_body(n: int) -> dict:
    import pydoc_data.topics

    topics = [t.split() for t in pydoc_data.topics.topics.values() if len(t.split()) > 200]
    return {"query": QUERY, "documents": [" ".join(topics[(n + 7 * i) % len(topics)][:60 + (13 * i) % 80])
                                          for i in range(8)]}


class RawRequest:
    """One POST over a raw socket: the body sent piece by piece until the server answers (or it is all
    sent), then the status line read. A server that answers early and closes is read, not an error."""

    def __init__(self, port: int, path: str = "/v2/rerank"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     "Connection: close\r\n")
        self.answer = b""

    def answered(self) -> bool:
        while select.select([self.sock], [], [], 0)[0]:
            piece = self.sock.recv(65536)
            if not piece:
                return True
            self.answer += piece
        return b"\r\n" in self.answer

    def send(self, body_pieces, chunked: bool, length: int | None = None) -> int:
        head = self.head + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {length}\r\n")
        try:
            self.sock.sendall((head + "\r\n").encode())
            for piece in body_pieces:
                if self.answered():
                    break
                self.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            else:
                if chunked:
                    self.sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed; its answer is read below
        self.sock.settimeout(120)
        try:
            while b"\r\n" not in self.answer:
                piece = self.sock.recv(65536)
                if not piece:
                    break
                self.answer += piece
        except OSError:
            pass
        self.sock.close()
        line = self.answer.split(b"\r\n", 1)[0].split()
        return int(line[1]) if len(line) > 1 and line[1].isdigit() else -1


def _hostile_once(port: int, kind: str, long_doc: bytes, long_doc_chunked: bytes) -> int:
    req = RawRequest(port)
    if kind == "chunked":
        piece = b" " * (1 << 20)
        return req.send((piece for _ in range(64)), chunked=True)
    if kind == "trickle":
        def trickle():
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                yield b" "
                time.sleep(0.2)
        return req.send(trickle(), chunked=True)
    if kind == "nested":
        body = b'{"query": "q", "documents": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    else:
        body = long_doc if kind == "long-doc" else long_doc_chunked
    return req.send((body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)), chunked=False, length=len(body))


def _chunked_status(app_args: dict, chunking: dict) -> int:
    """What long-doc-chunked should answer under the config: 413 when its 64 chunks of their size (the
    default model's room for QUERY, or chunk_tokens below it) pass limits.max_chunk_tokens_per_request."""
    from transformers import AutoTokenizer

    from prism_ray.chunking import chunk_size
    from prism_ray.config import AppConfig
    from prism_ray.prompt import PrismPromptTokenizer

    config = AppConfig.model_validate(app_args)
    model = config.find_model(None)
    prompts = PrismPromptTokenizer(AutoTokenizer.from_pretrained(model.model), max_length=model.max_length)
    size = chunk_size(prompts, QUERY, chunking.get("chunk_tokens"))
    return 413 if chunking["max_chunks_per_doc"] * size > config.limits.max_chunk_tokens_per_request else 200


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="deployments/local.yaml")
    ap.add_argument("--seconds", type=float, default=60, help="the hostile phase")
    ap.add_argument("--baseline-seconds", type=float, default=30, help="normal clients alone, before it")
    ap.add_argument("--normal", type=int, default=4)
    ap.add_argument("--hostile", type=int, default=8)
    ap.add_argument("--kinds", default=",".join(EXPECTED), help="the hostile kinds, comma-separated")
    ap.add_argument("--direct", action="store_true",
                    help="Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1): clients talk to the router "
                         "replica's own HTTP server, not through Serve's proxy")
    ap.add_argument("--throughput-optimized", action="store_true",
                    help="Serve's throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, with direct ingress; gRPC "
                         "between replicas): implies --direct")
    ap.add_argument("--no-proxy-guard", action="store_true",
                    help="Serve's proxy without prism-ray's body guard (`prism-ray serve --no-proxy-guard`): it then "
                         "reads bodies ahead of the router, past the limit, before the router can refuse them")
    ap.add_argument("--chunk-tokens", type=int, default=None,
                    help="long-doc-chunked's chunking.chunk_tokens (default: unset, the model's room)")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    if set(kinds) - set(EXPECTED):
        raise SystemExit(f"--kinds: unknown {sorted(set(kinds) - set(EXPECTED))}; known: {', '.join(EXPECTED)}")

    import ray
    from ray import serve

    from deployments.app import build_app

    app_args = yaml.safe_load(Path(args.config).read_text())["applications"][0]["args"]
    words = _words(15_000_000)
    long_doc = json.dumps({"query": QUERY, "documents": [words]}).encode()
    chunking = {"max_chunks_per_doc": 64, **({"chunk_tokens": args.chunk_tokens} if args.chunk_tokens else {})}
    long_doc_chunked = json.dumps({"query": QUERY, "documents": [words], "chunking": chunking}).encode()
    print(f"long document: {len(words) / 1e6:.1f} M characters, {len(words.split()) / 1e6:.1f} M words; "
          f"body {len(long_doc) / 1e6:.1f} MB", flush=True)
    del words

    args.direct = args.direct or args.throughput_optimized
    # read by every Serve process at import: set before the cluster starts them
    guard = None if args.no_proxy_guard else {"/": LimitsConfig.model_validate(app_args.get("limits") or {})}
    os.environ.update(serve_environment(os.environ, args.direct, args.throughput_optimized, guard))
    print(f"Serve's proxy {'without' if guard is None else 'with'} the body guard", flush=True)
    ray.init(num_cpus=8, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="prism", route_prefix="/")
    if args.direct:
        port = ingress_ports()["prism"]
        print(f"direct ingress: clients talk to the router replica on 127.0.0.1:{port}", flush=True)
    base = f"http://127.0.0.1:{port}"
    expected = {**EXPECTED, "long-doc-chunked": {_chunked_status(app_args, chunking)}}  # its checkpoint is built now

    normal: list[tuple[str, int, float, dict[str, float]]] = []  # (phase, status, seconds, Server-Timing ms)
    hostile: list[tuple[str, int, float]] = []  # (kind, status, seconds)
    phase = ["baseline"]
    stop_normal, stop_hostile = threading.Event(), threading.Event()

    def normal_client(k: int) -> None:
        n = k
        with httpx.Client(base_url=base, timeout=120) as client:
            while not stop_normal.is_set():
                started, now = time.monotonic(), phase[0]
                timing: dict[str, float] = {}
                try:
                    reply = client.post("/v2/rerank", json=_normal_body(n))
                    status, timing = reply.status_code, _server_timing(reply.headers.get("server-timing", ""))
                except httpx.HTTPError:
                    status = -1
                normal.append((now, status, time.monotonic() - started, timing))
                n += 1

    def hostile_client(k: int) -> None:
        n = k
        while not stop_hostile.is_set():
            kind = kinds[n % len(kinds)]
            started = time.monotonic()
            status = _hostile_once(port, kind, long_doc, long_doc_chunked)
            hostile.append((kind, status, time.monotonic() - started))
            n += 1

    with httpx.Client(base_url=base, timeout=120) as warm:  # every replica loaded before the clock starts
        warm.post("/v2/rerank", json=_normal_body(0)).raise_for_status()
    normals = [threading.Thread(target=normal_client, args=(k,), daemon=True) for k in range(args.normal)]
    for t in normals:
        t.start()
    cpu = [_cpu_now()]
    time.sleep(args.baseline_seconds)
    at_start = serve_processes(proxies=True)
    cpu.append(_cpu_now())
    phase[0] = "hostile"
    hostiles = [threading.Thread(target=hostile_client, args=(k,), daemon=True) for k in range(args.hostile)]
    for t in hostiles:
        t.start()
    peak: dict[str, int] = {}
    started = time.monotonic()
    try:
        while time.monotonic() - started < args.seconds:
            time.sleep(2)
            for name, (_, kib) in serve_processes(proxies=True).items():
                peak[name] = max(peak.get(name, 0), kib)
        stop_hostile.set()
        for t in hostiles:
            t.join(timeout=120)
        at_end = serve_processes(proxies=True)
        cpu.append(_cpu_now())
    finally:
        stop_normal.set()
        stop_hostile.set()
        for t in normals:
            t.join(timeout=150)
        serve.shutdown()
        ray.shutdown()

    failures = []
    print(f"\nnormal clients ({args.normal}): baseline {args.baseline_seconds:g} s, then {args.seconds:g} s beside "
          f"{args.hostile} hostile clients")
    p99 = {}
    for name in ("baseline", "hostile"):
        rows = [r for r in normal if r[0] == name]
        statuses: dict[int, int] = {}
        for _, status, _, _ in rows:
            statuses[status] = statuses.get(status, 0) + 1
        seconds = [s for _, st, s, _ in rows if st == 200]
        p99[name] = percentile(seconds, 0.99)
        print(f"  {name:8s} {len(rows):5d} requests, statuses {dict(sorted(statuses.items()))}, "
              f"p50 {1000 * statistics.median(seconds) if seconds else float('nan'):7.0f} ms, "
              f"p99 {1000 * p99[name]:7.0f} ms")
        _print_split([(1000 * s, t) for _, st, s, t in rows if st == 200 and "scorer" in t and "router" in t])
        if set(statuses) - {200}:
            failures.append(f"normal requests not 200 in the {name} phase: {statuses}")
    ratio = p99["hostile"] / p99["baseline"]
    print(f"  p99 beside hostile clients / baseline p99: {ratio:.2f}x (target <= 2x)")
    if ratio > 2:
        failures.append(f"normal p99 {ratio:.2f}x the baseline's")

    print(f"\nhostile requests ({len(hostile)}; long-doc-chunked: {chunking}), by kind: status x count, and seconds to the answer (median, max)")
    for kind in kinds:
        rows = [r for r in hostile if r[0] == kind]
        statuses: dict[int, int] = {}
        for _, status, _ in rows:
            statuses[status] = statuses.get(status, 0) + 1
        secs = [s for _, _, s in rows]
        print(f"  {kind:17s} {dict(sorted(statuses.items()))}  "
              + (f"median {statistics.median(secs):6.2f} s, max {max(secs):6.2f} s" if secs else ""))
        if set(statuses) - expected[kind]:
            failures.append(f"{kind}: statuses {statuses}, expected {sorted(expected[kind])}")

    _print_cpu(cpu)
    print("\nresident memory (MiB) at the start of the hostile phase -> its end (peak)")
    for name in sorted(at_start):
        pid, start_kib = at_start[name]
        if name not in at_end or at_end[name][0] != pid:
            print(f"  {name:40s} {start_kib / 1024:7.0f} -> gone (restarted)")
            failures.append(f"{name} restarted")
            continue
        growth = (at_end[name][1] - start_kib) / 1024
        print(f"  {name:40s} {start_kib / 1024:7.0f} -> {at_end[name][1] / 1024:7.0f} ({growth:+.0f}), "
              f"peak {peak.get(name, 0) / 1024:.0f}")
        if growth > MAX_GROWTH_MIB:
            failures.append(f"{name} grew {growth:.0f} MiB")
    for name in sorted(set(at_end) - set(at_start)):  # a replica the autoscaler added: it shares the cores
        print(f"  {name:40s}   (new) -> {at_end[name][1] / 1024:7.0f}")
    print("\n" + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
