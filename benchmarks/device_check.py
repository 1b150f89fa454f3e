"""The GPU check (v4), in one go and without Ray: fp32 parity with path A on the device, then bf16 figures.

    bash benchmarks/device_check.sh          # on a CUDA machine (the 0.8b preset); stopped at 480 s by the .sh
    bash benchmarks/device_check.sh --skip parity --evidence-pairs 64   # 256 s on an H200 in v3 (parity alone: ~200 s)
    bash benchmarks/device_check.sh --cpu    # the same steps on the tiny preset and small sizes: a dry run

`--compiled` also runs every section with the pointwise chains compiled, beside the eager ones: on a cold H200
that added about three minutes of compiling to v4 run 1 (its checks section took 230 s against v3's 52 s).

Sections, each in its own try (one that fails prints why and the others still run), in order of what matters
most if the run is cut short, figures gathered into one table at the end:
- parity: fp32 scores against path A one prompt per forward, with the device's default kernels (exits 1 if
  it fails) and with every other kernel choice (reported);
- checks: float32 kernel checks that cost little device time: fla's convolution against torch's, and decode
  steps replayed from CUDA graphs against eager ones (logits, argmax, whole greedy answers);
- kernels: the kernel choices (`engine.kernels.CHOICES`) and both query-prefix policies (`prefix_min_docs`)
  on the same bf16 weights at 1 x 20 and 16 x 20, warm, side by side (`bench_kernels.compare`): prompt
  tokens/s and score differences;
- scoring: ScoreEngine (each size's fastest of the kernels section) and path A batched (a plain forward over
  right-padded whole prompts) on 1 x 20 and 16 x 20: prompt tokens/s, first call and warm;
- evidence: generated tokens/s with 32 and 64 sequences decoding concurrently, eager and replayed from CUDA
  graphs, and whether the two wrote the same text;
- profile: one warm call of each: GPU busy time against wall time, host syncs, computed tokens (the engine's
  packed rows and prefixes; path A's padded batches), microseconds of GPU time per computed token next to the
  GEMM floor (the layers' projection FLOPs per token at the rate a plain bf16 matmul reaches on this device),
  and the kernel-time split (GEMM / linear attention / conv / attention / copies / elementwise / other);
- new shape: the first and second call of a workload of a shape not seen before (compile and autotune cost).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import choices_here, compare, contenders, workload  # noqa: E402  (benchmarks/, the script's folder)

from prism_ray.checkpoints import build_checkpoint  # noqa: E402
from prism_ray.engine import EvidenceEngine, ScoreEngine, fla_ops, load_model  # noqa: E402
from prism_ray.engine.batching import budget_batches  # noqa: E402
from prism_ray.engine.loading import with_kernels  # noqa: E402
from prism_ray.engine.score import sigmoid  # noqa: E402

WARM_CALLS = 7
POINTWISE = ["eager"]  # the pointwise choices compared; --compiled adds "compiled" (v4 run 2: 111 s of compiling)
TOP_KERNELS = 8
GPU_SIZES = {"one": (1, 20), "packed": (16, 20), "new shape": (3, 13), "evidence": ((32, 64), 128)}
CPU_SIZES = {"one": (1, 4), "packed": (4, 4), "new shape": (2, 3), "evidence": ((2, 3), 8)}
KERNEL_KINDS = (  # first match wins, on the lower-cased kernel (or op) name
    ("linear attention", ("chunk", "gated_delta", "fused_recurrent", "solve_tril", "cumsum", "delta", "triangular")),
    ("conv", ("conv",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("GEMM", ("gemm", "matmul", "cutlass", "cublas", "sm90_xmma", "nvjet", "bmm", "addmm", "mm", "linear")),
    ("copies", ("copy", "memcpy", "memset", "cat", "index", "gather", "scatter", "fill")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "mul", "add", "silu", "sigmoid", "exp", "rsqrt", "pow", "mean")),
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


@torch.inference_mode()
def path_a_batched(loaded, groups, token_budget: int) -> list[float]:
    """The card's path A as a plain batched forward: whole prompts, right-padded, yes/no at the last token."""
    p, dev = loaded.prompts, loaded.device
    prompts = [p.encode(q, d).ids for q, docs in groups for d in docs]
    logits = [0.0] * len(prompts)
    for batch in budget_batches([len(x) for x in prompts], token_budget):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), p.pad_id, dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, : len(prompts[i])] = torch.tensor(prompts[i])
        last = torch.tensor([len(prompts[i]) - 1 for i in batch], device=dev)
        hidden = loaded.model.model(input_ids=ids.to(dev)).last_hidden_state[torch.arange(len(batch), device=dev), last]
        out = loaded.model.lm_head(hidden).float()
        for r, i in enumerate(batch):
            logits[i] = (out[r, p.yes_id] - out[r, p.no_id]).item()
    return [sigmoid(x) for x in logits]


def parity(ckpt: Path, device: str) -> bool:
    """fp32 parity with path A run one prompt per forward (the card's reference exactly).

    With the device's default kernels, two figures: the engine one row per forward (the algorithm: must be
    within 1e-5), and the engine at its own token budget (rows packed into one forward). The second is held
    to 1e-5 or to path A's own spread between one prompt per forward and right-padded batches, whichever is
    larger: the reference kernels (the chunked Gated DeltaNet above all) reduce in a different order when the
    batch width changes, and no engine can be closer to path A than path A is to itself. Every other kernel
    choice is then measured at its token budget and reported (Triton's float32 dots may round as tf32).
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    loaded = load_model(ckpt, dtype="float32", device=device)
    groups = workload(3, 5)
    ref = path_a_batched(loaded, groups, token_budget=1)
    floor = max(abs(a - b) for a, b in zip(ref, path_a_batched(loaded, groups, token_budget=1 << 20)))
    ok = True
    for label, budget, limit in (("one row per forward", 1, 1e-5), ("at its token budget", None, max(1e-5, 1.5 * floor))):
        ours = [r.score for g in ScoreEngine(loaded, token_budget=budget).score(groups) for r in g]
        diff = max(abs(a - b) for a, b in zip(ours, ref))
        ok &= diff <= limit
        print(f"fp32 parity with path A on {device}, default kernels ({_names(loaded.kernels)}), engine {label}: "
              f"max |score diff| = {diff:.2e} over {len(ours)} pairs "
              f"({'ok' if diff <= limit else 'FAILED'}: limit {limit:.2e}; path A batched vs one by one: {floor:.2e})", flush=True)
    record("parity", f"fp32 vs path A, default kernels ({_names(loaded.kernels)})", "ok" if ok else "FAILED")
    for choice in [c for c in choices_here(loaded.device) if c["pointwise"] in POINTWISE]:
        try:
            other = with_kernels(loaded, choice)
            ours = [r.score for g in ScoreEngine(other).score(groups) for r in g]
            record("parity", f"fp32 vs path A, {_names(choice)}", f"max |score diff| {max(abs(a - b) for a, b in zip(ours, ref)):.2e} "
                   f"(path A batched vs one by one {floor:.2e})")
        except Exception as exc:  # noqa: BLE001 - reported, the next choice still runs
            record("parity", f"fp32 vs path A, {_names(choice)}", f"FAILED: {type(exc).__name__}: {exc}".splitlines()[0][:160])
    return ok


def _names(choice: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in choice.items() if k in ("attention", "gated_delta_rule", "pointwise"))


TABLE: list[tuple[str, str, str]] = []  # (section, what, figure)


def record(section: str, what: str, figure: str) -> None:
    TABLE.append((section, what, figure))
    print(f"  [{section}] {what}: {figure}", flush=True)


@contextlib.contextmanager
def section(name: str):
    """A section of the check: its failure is printed and recorded, and the next section runs."""
    print(f"-- {name}", flush=True)
    t0 = time.perf_counter()
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - a failing section is reported, never fatal to the others
        traceback.print_exc()
        record(name, "FAILED", f"{type(exc).__name__}: {exc}".splitlines()[0][:120])
    print(f"   ({name}: {time.perf_counter() - t0:.1f} s)", flush=True)


def print_table() -> None:
    width = max((len(w) for _, w, _ in TABLE), default=10)
    print("\n| section | what | figure |\n|---|---|---|")
    for sec, what, figure in TABLE:
        print(f"| {sec} | {what:<{width}} | {figure} |")


def calls(loaded, engine: ScoreEngine, groups):
    return {"ScoreEngine": lambda: engine.score(groups),
            "path A batched": lambda: path_a_batched(loaded, groups, engine.token_budget)}


def scoring(loaded, engines: dict[str, ScoreEngine], sizes: dict) -> None:
    """Each case's engine (the kernels section's fastest, or the defaults), the same engine with the other
    pointwise choice (eager / compiled), and path A batched, on 1 x 20 and 16 x 20: the first call, then the median of
    `WARM_CALLS` warm calls taken in turns."""
    dev = loaded.device
    for case in ("one", "packed"):
        queries, docs = sizes[case]
        groups = workload(queries, docs)
        base = engines[case]
        other = "eager" if base.loaded.kernels.get("pointwise") == "compiled" else "compiled"
        contenders = {f"ScoreEngine ({base.loaded.kernels.get('pointwise')})": base}
        if other in POINTWISE:
            contenders[f"ScoreEngine ({other})"] = ScoreEngine(with_kernels(base.loaded, {"pointwise": other}),
                                                               token_budget=base.token_budget, prefix_min_docs=base.prefix_min_docs)
        tokens = sum(engines[case].prompts.encode(q, d).num_tokens for q, ds in groups for d in ds)
        runs = {name: (lambda e=e, groups=groups: e.score(groups)) for name, e in contenders.items()}
        runs["path A batched"] = lambda groups=groups, budget=base.token_budget: path_a_batched(loaded, groups, budget)
        for name, e in contenders.items():
            record("scoring", f"{queries} x {docs} {name} setting", f"{_names(e.loaded.kernels)}, prefix_min_docs={e.prefix_min_docs}")
        first = {name: timed(call, dev)[1] for name, call in runs.items()}
        warm: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(WARM_CALLS):  # the contenders take turns, so a slow moment of the machine hits all
            for name, call in runs.items():
                warm[name].append(timed(call, dev)[1])
        for label, times in (("first call", first), (f"warm, median of {WARM_CALLS}", {n: statistics.median(t) for n, t in warm.items()})):
            for name, t in times.items():
                record("scoring", f"{queries} x {docs} {name} ({label})", f"{tokens / t:,.0f} prompt tokens/s ({t * 1e3:.1f} ms)")
            for name in contenders:
                record("scoring", f"{queries} x {docs} {name} / path A ({label})", f"{times['path A batched'] / times[name]:.2f}x")


def host_syncs(fn, device: torch.device) -> int | None:
    """How many times `fn()` made the host wait for the GPU (torch's sync debug mode warns once per
    synchronizing call); None off CUDA."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def computed_tokens(loaded, engine: ScoreEngine, groups) -> dict[str, int]:
    """Tokens each contender runs through the layers: the engine's packed rows (prefixes included), path A's
    right-padded batches (pads included)."""
    net, seen = engine.loaded.net, []
    real = net.forward_rows
    net.forward_rows = lambda ids, rows, **kw: seen.append(sum(rows.lengths)) or real(ids, rows, **kw)
    try:
        engine.score(groups)
    finally:
        del net.forward_rows
    lengths = [engine.prompts.encode(q, d).num_tokens for q, ds in groups for d in ds]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in budget_batches(lengths, engine.token_budget))
    return {"ScoreEngine": sum(seen), "path A batched": padded}


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


@torch.inference_mode()
def gemm_floor_us_per_token(loaded) -> tuple[float, float]:
    """(microseconds per token, TFLOP/s): the decoder layers' projection FLOPs per token at the rate a plain
    matmul of those shapes (8192 rows, the model's dtype) reaches here."""
    dev, dtype = loaded.device, loaded.dtype
    shapes = [tuple(p.shape) for n, p in loaded.model.named_parameters() if p.ndim == 2 and ".layers." in f".{n}"]
    rows = 8192 if dev.type == "cuda" else 256
    flops = seconds = 0.0
    for out_f, in_f in set(shapes):
        a, w = torch.randn(rows, in_f, device=dev, dtype=dtype), torch.randn(in_f, out_f, device=dev, dtype=dtype)
        a @ w
        _, t = timed(lambda a=a, w=w: [a @ w for _ in range(5)], dev)
        flops += 5 * 2.0 * rows * in_f * out_f * shapes.count((out_f, in_f))
        seconds += t * shapes.count((out_f, in_f))
    rate = flops / seconds
    per_token = sum(2.0 * o * i for o, i in shapes)
    return 1e6 * per_token / rate, rate / 1e12


def profile_calls(loaded, engines: dict[str, ScoreEngine], sizes: dict) -> None:
    from torch.profiler import ProfilerActivity, profile

    dev = loaded.device
    cuda = dev.type == "cuda"
    floor, tflops = gemm_floor_us_per_token(loaded)
    record("profile", "GEMM floor", f"{floor:.2f} us per token (plain matmul of the layer shapes: {tflops:.3g} TFLOP/s)")
    for case in ("one", "packed"):
        queries, docs = sizes[case]
        engine = engines[case]
        groups = workload(queries, docs)
        computed = computed_tokens(loaded, engine, groups)
        for name, call in calls(loaded, engine, groups).items():
            if name == "path A batched" and case == "one":
                continue  # profiled in the first H200 run (README); device time goes to the engine
            call()  # warm
            syncs = host_syncs(call, dev)
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                _, wall = timed(call, dev)
            busy, split, top = kernel_times(prof, cuda)
            busy = busy if cuda else wall
            what = f"{queries} x {docs} {name}"
            record("profile", f"{what} busy / wall", f"{busy:.3f} s / {wall:.3f} s ({busy / wall:.0%})"
                   + (f", host syncs {syncs}" if syncs is not None else ""))
            record("profile", f"{what} per computed token", f"{1e6 * busy / computed[name]:.2f} us over {computed[name]} tokens "
                   f"({1e6 * busy / computed[name] / floor:.1f}x the GEMM floor)")
            total = sum(split.values()) or 1.0
            record("profile", f"{what} kernel split", ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in
                                                                  sorted(split.items(), key=lambda kv: -kv[1])))
            record("profile", f"{what} top kernels", top)


def kernel_times(prof, cuda: bool) -> tuple[float, dict[str, float], str]:
    """From a profile: GPU busy seconds, kernel time by kind (`KERNEL_KINDS`), and the `TOP_KERNELS` kernels
    that took the most time (share, calls, name cut short). Off CUDA, aten ops' CPU self time stands in."""
    from torch.autograd import DeviceType

    if cuda:
        busy = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6
        times = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    else:
        busy = 0.0
        times = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages() if e.key.startswith("aten::")]
    split: dict[str, float] = {}
    for key, t, _ in times:
        split[kernel_kind(key)] = split.get(kernel_kind(key), 0.0) + t
    total = sum(t for _, t, _ in times) or 1.0
    top = sorted(times, key=lambda x: -x[1])[:TOP_KERNELS]
    return busy, split, "; ".join(f"{100 * t / total:.0f}% x{n} {key[:70]}" for key, t, n in top)


def new_shape(loaded, engine: ScoreEngine, sizes: dict) -> None:
    queries, docs = sizes["new shape"]
    groups = workload(queries, docs)
    _, first = timed(lambda: engine.score(groups), loaded.device)
    _, second = timed(lambda: engine.score(groups), loaded.device)
    record("new shape", f"{queries} x {docs} first call vs second", f"{first:.3f} s vs {second:.3f} s (+{first - second:.3f} s)")


def kernels(loaded, sizes: dict, token_budget: int | None) -> dict[str, ScoreEngine]:
    """Every kernel choice and both query-prefix policies, at 1 x 20 and 16 x 20, warm; returns the fastest
    engine of each case. On CUDA only the pointwise choices over the padded attention and fla's kernels where
    fla is installed: the H200 runs of v3 measured the per-row attention and the project's scan slower there."""
    choices = choices_here(loaded.device)
    if loaded.device.type == "cuda":
        linear = "fla" if fla_ops.available() else None
        choices = [c for c in choices if c["attention"] == "padded" and (linear is None or linear == c["gated_delta_rule"] == c["causal_conv1d"])]
    choices = [c for c in choices if c["pointwise"] in POINTWISE]
    fastest: dict[str, ScoreEngine] = {}
    for case in ("one", "packed"):
        queries, docs = sizes[case]
        made = dict(contenders(loaded, choices, token_budget, prefix_min_docs=(1, 1 << 30)))
        rows = compare(loaded, workload(queries, docs), list(made.items()), repeats=3)
        for row in rows:
            if "error" in row:
                record("kernels", f"{queries} x {docs} {row['choice']}", f"FAILED: {row['error']}")
            else:
                record("kernels", f"{queries} x {docs} {row['choice']}", f"{row['tokens_per_s']:,.0f} prompt tokens/s "
                       f"({row['seconds'] * 1e3:.1f} ms; max |score diff| vs first {row['max_diff']:.2e})")
        ran = [r for r in rows if "error" not in r]
        if ran:
            fastest[case] = made[max(ran, key=lambda r: r["tokens_per_s"])["choice"]]()
    return fastest


def checks(ckpt: Path, bf16) -> None:
    """Kernel checks in float32 that cost little device time: fla's convolution against torch's (the rest of
    the forward the project's exact kernels), then decode replayed from CUDA graphs against eager decode."""
    fp32 = load_model(ckpt, dtype="float32", device=str(bf16.device))
    groups = workload(3, 5)
    if fp32.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        base = [r.score for g in ScoreEngine(fp32).score(groups) for r in g]
        conv = [r.score for g in ScoreEngine(with_kernels(fp32, {"causal_conv1d": "fla", "gated_delta_rule": "prism"})).score(groups) for r in g]
        record("checks", "float32 scores, causal_conv1d fla vs torch", f"max |score diff| {max(abs(a - b) for a, b in zip(base, conv)):.2e}")
    ref = path_a_batched(fp32, groups, token_budget=1 << 20)
    for pw in POINTWISE:
        ours = [r.score for g in ScoreEngine(with_kernels(fp32, {"pointwise": pw})).score(groups) for r in g]
        record("checks", f"float32 scores vs path A batched, pointwise={pw}", f"max |score diff| {max(abs(a - b) for a, b in zip(ours, ref)):.2e}")
    graph_equality(fp32, bf16)


def graph_equality(fp32, bf16) -> None:
    """Decode steps replayed from CUDA graphs against eager ones, on the same prefilled slots (7 rows of an
    8-slot pool: a bucket of 8 with one free slot): max |logit difference| and argmax agreement over 16 steps,
    in float32, bf16 and bf16 with compiled pointwise chains; then whole greedy answers in float32
    (EvidenceEngine with and without graphs)."""
    from prism_ray.engine.graphs import GraphedDecode
    from prism_ray.engine.models import SlotPool, pack

    pairs = [(q, d) for q, docs in workload(7, 1) for d in docs]
    for loaded in (fp32, bf16) + ((with_kernels(bf16, {"pointwise": "compiled"}),) if "compiled" in POINTWISE else ()):
        net, dev = loaded.net, loaded.device
        rows = [loaded.prompts.encode(q, d).ids for q, d in pairs]
        hidden, states = net.forward_rows(*pack(rows, [None] * len(rows), dev), keep_states=True)
        pools = [SlotPool(net, len(rows) + 1, max(map(len, rows)) + 32) for _ in range(2)]
        for pool in pools:
            slots = [pool.allocate() for _ in rows]
            for slot, state in zip(slots, states):
                pool.store(slot, state)
        graphed = GraphedDecode(net, pools[0])
        tokens, positions = net.logits(hidden).argmax(-1), [len(r) for r in rows]
        worst, agree = 0.0, 0
        for _ in range(16):
            got = graphed.step(tokens, positions, slots).float()
            want = net.decode_step(tokens, positions, pools[1], pools[1].select(slots)).float()
            worst = max(worst, (got - want).abs().max().item())
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            tokens, positions = want.argmax(-1), [p + 1 for p in positions]
        record("checks", f"{loaded.dtype}, pointwise={loaded.kernels['pointwise']}: graph replay vs eager step, 7 rows x 16 steps",
               f"max |logit diff| {worst:.2e}, argmax agree {agree}/{16 * len(rows)}, graphs captured {graphed.captures}")
    if fp32.device.type != "cuda":
        return  # the dry run: EvidenceEngine's graphs are CUDA-only
    texts = {}
    for graphed in (False, True):
        out = EvidenceEngine(fp32, max_batch_size=len(pairs), cuda_graphs=graphed).generate(pairs, max_new_tokens=48)
        texts[graphed] = [r.text for r in out]
    same = sum(a == b for a, b in zip(texts[False], texts[True]))
    record("checks", "float32 greedy answers, graphs == eager", f"{same}/{len(pairs)} (48 new tokens each)")


def evidence(loaded, sizes: dict) -> None:
    """Generated tokens/s at each concurrency, replayed from CUDA graphs (eager on a CPU) with the pointwise
    chains eager and compiled, and where each run's time goes: the first loop step (every pair's prefill, then
    one decode window) against the decode steps after it, with the GPU's busy share and top kernels of those.
    (Eager decoding on the GPU was measured by v3: 2,531 generated tokens/s at 64.)"""
    concurrency, new = sizes["evidence"]
    graphed = loaded.device.type == "cuda"
    runs = {f"{'CUDA graphs' if graphed else 'eager'}, pointwise={pw}": with_kernels(loaded, {"pointwise": pw}) for pw in POINTWISE}
    for pairs in concurrency:
        work = [(q, d) for q, docs in workload(pairs, 1) for d in docs]
        texts = {}
        for how, model in runs.items():
            ev = EvidenceEngine(model, max_batch_size=pairs, cuda_graphs=graphed)
            for run in ("first call", "warm"):
                out, t = timed(lambda ev=ev, work=work: ev.generate(work, max_new_tokens=new), loaded.device)
                generated = sum(r.generated_tokens for r in out)
                record("evidence", f"{pairs} concurrent x {new} new tokens, {how} ({run})",
                       f"{generated / t:,.0f} generated tokens/s ({generated} in {t:.2f} s)")
            texts[how] = [r.text for r in out]
            _decode_split(ev, work, new, f"{pairs} concurrent, {how}")
        if len(texts) == 2:
            (a, ta), (b, tb) = texts.items()
            record("evidence", f"{pairs} concurrent: same text, {a} and {b} ({loaded.dtype})", f"{sum(x == y for x, y in zip(ta, tb))}/{len(work)}")


def _decode_split(ev: EvidenceEngine, work, new: int, what: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    dev = ev.loaded.device
    loop = ev._take_loop(len(work), max(ev.prompts.encode(q, d).num_tokens for q, d in work) + new + ev.sync_every)
    for i, (q, d) in enumerate(work):
        loop.add(ev.sequence(q, d, max_new_tokens=new, index=i))
    _, first = timed(loop.step, dev)
    steps, windows = 0, 0
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        while loop.pending and windows < 4:
            steps += loop.step()[2]
            windows += 1
        sync(dev)
        wall = time.perf_counter() - t0
    busy, split, top = kernel_times(prof, dev.type == "cuda")
    busy = busy if dev.type == "cuda" else wall
    record("evidence", f"{what}: first step (prefill + window) / decode step",
           f"{first * 1e3:.0f} ms / {wall / max(steps, 1) * 1e3:.2f} ms per step, GPU busy {busy / wall:.0%} of those steps")
    total = sum(split.values()) or 1.0
    record("evidence", f"{what}: decode kernel split", ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(split.items(), key=lambda kv: -kv[1])))
    record("evidence", f"{what}: decode top kernels", top)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="dry run: tiny preset, small sizes, on the CPU")
    ap.add_argument("--token-budget", type=int, default=None)
    ap.add_argument("--evidence-pairs", default=None, help="concurrent sequences of the evidence section, comma-separated "
                                                            "(default 32,64 on a GPU)")
    ap.add_argument("--compiled", action="store_true", help="also the compiled pointwise chains, beside the eager ones "
                                                             "(minutes of compiling on a cold machine)")
    ap.add_argument("--out", default="checkpoints")
    ap.add_argument("--skip", default="", help="sections to skip, comma-separated: parity,checks,kernels,scoring,evidence,profile,new shape")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.compiled:
        POINTWISE.append("compiled")
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --cpu for the dry run", file=sys.stderr)
        return 2
    preset = "tiny" if args.cpu else "0.8b"
    ckpt = Path(args.out) / preset
    if not (ckpt / "config.json").is_file():
        build_checkpoint(preset, ckpt)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device check v4: {name}, preset {preset}, torch {torch.__version__}", flush=True)
    ok = True
    if "parity" not in skip:
        with section("parity"):
            ok = parity(ckpt, device)
    sizes = dict(CPU_SIZES if args.cpu else GPU_SIZES)
    if args.evidence_pairs:
        sizes["evidence"] = (tuple(int(x) for x in args.evidence_pairs.split(",")), sizes["evidence"][1])
    bf16 = load_model(ckpt, dtype="bfloat16", device=device)
    record("setup", "bf16 default kernels", ", ".join(f"{k}={v}" for k, v in bf16.kernels.items()))
    if "checks" not in skip:
        with section("checks"):
            checks(ckpt, bf16)
    engines: dict[str, ScoreEngine] = {}
    if "kernels" not in skip:
        with section("kernels"):
            engines = kernels(bf16, sizes, args.token_budget)
    for case in ("one", "packed"):
        engines.setdefault(case, ScoreEngine(bf16, token_budget=args.token_budget))
    record("setup", "ScoreEngine.warm_up()", f"{engines['packed'].warm_up():.2f} s (token budget {engines['packed'].token_budget})")
    steps = {"scoring": lambda: scoring(bf16, engines, sizes), "evidence": lambda: evidence(bf16, sizes),
             "profile": lambda: profile_calls(bf16, engines, sizes), "new shape": lambda: new_shape(bf16, engines["packed"], sizes)}
    for name, step in steps.items():
        if name not in skip:
            with section(name):
                step()
    print_table()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
