"""EvidenceEngine: the model's full answer (yes/no, contribution, evidence), generated per step from a slot pool.

A pair becomes a `Sequence` (its prompt tokens, its own `max_new_tokens` and temperature); a `DecodeLoop`
runs sequences to their end:

- Prefill: each query's shared prefix runs once (`prefix.PrefixCache`); the admitted pairs' remaining tokens
  run packed (no padding) in forwards of up to `token_budget` tokens, each row continuing from its query's
  prefix state, and each row's state (attention K/V, Gated DeltaNet conv and recurrent state after its own
  last token) is written into a free slot of a preallocated `SlotPool`.
- Decode: every active slot advances one token per step, in place; the host reads the new tokens every
  `sync_every` steps and retires rows at their stop token, their own `max_new_tokens` or their
  cancellation (freeing their slot, nothing else moves); waiting sequences are admitted into the free slots
  before the next steps, so a short answer never waits for a long one.

`EvidenceEngine.generate` runs one loop over a list of pairs in the calling thread; `scheduler.Scheduler` runs
one loop for as long as a server lives, fed by `submit` from other threads.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from prism_ray.engine.batching import packed_batches
from prism_ray.engine.graphs import GraphedDecode
from prism_ray.engine.loading import LoadedModel, load_model
from prism_ray.engine.models import SequenceState, SlotPool, pack
from prism_ray.engine.score import elapsed, sigmoid, validate_group
from prism_ray.engine.transfer import to_device
from prism_ray.output import parse_output
from prism_ray.prompt import DEFAULT_MAX_LENGTH, EncodedPair
from prism_ray.results import EvidenceResult

DEFAULT_MAX_NEW_TOKENS = 512
# Prompt tokens per prefill forward (packed: real tokens); 1 runs each pair on its own. On a 2-core CPU,
# packed batches of 1024 beat one pair per forward (`benchmarks/bench_prefill.py --preset 0.8b`, see README).
DEFAULT_PREFILL_BUDGET = {"cpu": 1024, "cuda": 16384}
# Decode steps between host syncs. On a GPU a sync stalls the queue of kernels, so the host reads new tokens
# every 8 steps; on a CPU reading them costs nothing, and syncing every step lets a pair join (or leave) the
# running decode at the next step instead of up to 8 steps later: `benchmarks/bench_evidence_serve.py`
# measured a short request behind three long ones at 3.7x its latency alone with 8 (see README).
DEFAULT_SYNC_EVERY = {"cpu": 1, "cuda": 8}


@dataclass(eq=False)
class Sequence:
    """One pair on its way through a decode loop."""

    index: int  # the caller's number for it (its position in a generate call)
    query: str
    pair: EncodedPair
    max_new_tokens: int
    temperature: float
    generator: torch.Generator | None = field(default=None, repr=False)  # sampled sequences only
    tokens: list[int] = field(default_factory=list)
    logit: float = 0.0
    slot: int = -1
    done: bool = False
    cancelled: bool = False  # set from any thread; the loop retires it at its next step
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    context: SequenceState | None = field(default=None, repr=False)  # its query's prefix state, while waiting
    state: SequenceState | None = field(default=None, repr=False)  # after prefill, until stored in the pool


class EvidenceEngine:
    def __init__(self, model: str | Path | LoadedModel, dtype: str | torch.dtype = "auto",
                 device: str | None = None, max_length: int = DEFAULT_MAX_LENGTH, max_batch_size: int = 32,
                 token_budget: int | None = None, cuda_graphs: bool | None = None):
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype, device, max_length)
        on_cuda = self.loaded.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs needs a CUDA device, not {self.loaded.device.type}")
        # Decode steps replayed from CUDA graphs (`graphs.py`); None: on CUDA, where the H200 run of
        # device_check.sh found replay equal to eager decoding (README).
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self.max_batch_size = max_batch_size  # slots of a generate call: pairs decoding at once
        # Prompt tokens per prefill forward.
        self.token_budget = token_budget or DEFAULT_PREFILL_BUDGET.get(self.loaded.device.type, 8192)
        self.sync_every = DEFAULT_SYNC_EVERY.get(self.loaded.device.type, 8)  # decode steps between host syncs
        self._stop = set(self.loaded.prompts.eos_ids)
        # With CUDA graphs, `generate` calls reuse one decode loop (its pool, and the graphs captured over it)
        # instead of capturing anew each call; elsewhere a loop lives for one call, so no pool stays allocated.
        self._idle_loop: DecodeLoop | None = None
        self._loop_lock = threading.Lock()

    @property
    def prompts(self):
        return self.loaded.prompts

    def warm_up(self) -> float:
        """Two-token generations of one, two and three pairs (prefill and decode at three batch sizes: the
        variants a compiled pointwise chain has, and a CUDA graph for each of their buckets), for the reason of
        `ScoreEngine.warm_up`."""
        docs = ["a warm-up document", "another", "and a third one"]
        return elapsed(lambda: [self.generate([("warm-up query", d) for d in docs[:n]], max_new_tokens=2, seed=0) for n in (1, 2, 3)])

    def sequence(self, query: str, document: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, seed: int | None = None, index: int = 0,
                 prefix: list[int] | None = None) -> Sequence:
        """A pair checked and tokenized, ready for a decode loop (`prefix`: the query's prefix tokens, when
        the caller has them). Sampled sequences get their own generator (seeded by `seed`, random without),
        so what one writes does not depend on what shares its batch."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError("max_new_tokens must be an integer >= 1")
        if not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError("temperature must be a number >= 0")
        validate_group(query, [document])
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.loaded.device)
            generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        return Sequence(index, query, self.prompts.encode(query, document, prefix=prefix), max_new_tokens,
                        float(temperature), generator)

    @torch.inference_mode()
    def generate(self, pairs: Seq[tuple[str, str]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, seed: int | None = None,
                 should_stop: Callable[[int], bool] | None = None) -> list[EvidenceResult]:
        """Answers for (query, document) pairs, in order. Greedy unless `temperature` > 0 (then pair i samples
        from its own generator, seeded by `seed + i`).

        `should_stop(i)` says that pair i's answer is no longer wanted (its caller left); it is asked at
        every host sync of the decode (every `sync_every` steps), and a stopped pair leaves there, its result
        holding what was generated until then.
        """
        prefixes: dict[str, list[int]] = {}  # each query's prefix tokenized once
        seqs = []
        for i, (q, d) in enumerate(pairs):
            validate_group(q, [d])
            if q not in prefixes:
                prefixes[q] = self.prompts.prefix(q)
            seqs.append(self.sequence(q, d, max_new_tokens, temperature, None if seed is None else seed + i,
                                      index=i, prefix=prefixes[q]))
        if not seqs:
            return []
        longest = max(s.pair.num_tokens for s in seqs)
        loop = self._take_loop(min(self.max_batch_size, len(seqs)), longest + max_new_tokens + self.sync_every)
        for s in seqs:
            loop.add(s)
        while loop.pending:
            loop.step()
            if should_stop is not None:
                for s in loop.active:
                    s.cancelled = s.cancelled or should_stop(s.index)
        self._keep_loop(loop)
        return [self.result(s) for s in seqs]

    def _take_loop(self, slots: int, max_len: int) -> DecodeLoop:
        """A decode loop of `slots` slots (the call's concurrency) for sequences of up to `max_len` tokens: the
        kept one (CUDA graphs) when it is idle and of that size, else a new one."""
        with self._loop_lock:
            loop, self._idle_loop = self._idle_loop, None
        if loop is None or loop.pool.slots != slots:
            return DecodeLoop(self, slots, max_len)
        loop.pool.grow(max_len)
        return loop

    def _keep_loop(self, loop: DecodeLoop) -> None:
        """Keep a loop that ran to its end for the next call (CUDA graphs only; a call that raised leaves its
        loop behind)."""
        if self.cuda_graphs and not loop.pending:
            with self._loop_lock:
                self._idle_loop = loop

    # -- prefill: packed rows, each from its query's prefix state ----------------------------------
    def _prefill(self, seqs: list[Sequence]) -> None:
        """Each sequence's first token, logit and state (`seq.state`, for the pool)."""
        prompts, net = self.loaded.prompts, self.loaded.net
        tails = [s.pair.ids[(s.context.length if s.context is not None else 0):] for s in seqs]
        for batch in packed_batches([len(t) for t in tails], self.token_budget):
            packed = pack([tails[k] for k in batch], [seqs[k].context for k in batch], self.loaded.device)
            hidden, row_states = net.forward_rows(*packed, keep_states=True)
            logits = net.logits(hidden)
            firsts = self._pick(logits, _sampled([seqs[k] for k in batch])).tolist()
            diffs = (logits[:, prompts.yes_id].float() - logits[:, prompts.no_id].float()).tolist()
            now = time.monotonic()
            for k, first, diff, state in zip(batch, firsts, diffs, row_states):
                s = seqs[k]
                s.tokens, s.logit, s.state, s.first_token_at = [first], diff, state, now
                s.done = first in self._stop or s.max_new_tokens == 1
                s.context = None

    # -- decode: every active slot, one token per step --------------------------------------------
    def _decode(self, active: list[Sequence], pool: SlotPool, graphs: GraphedDecode | None = None) -> int:
        """Up to `sync_every` steps of every active sequence, then one transfer brings the new tokens to the
        host: a sequence that reached a stop token keeps only what precedes it (and its stop), one that
        reached its `max_new_tokens` keeps that many, and both are marked done. A GPU never waits on the host
        per token; a finished row costs at most `sync_every - 1` extra steps of a batch that runs anyway.
        Returns the steps run. With `graphs`, each step is a graph replay."""
        net, device = self.loaded.net, self.loaded.device
        slots = [s.slot for s in active]
        sel = None if graphs else pool.select(slots)
        steps = min(self.sync_every, max(s.max_new_tokens - len(s.tokens) for s in active))
        last = to_device(torch.tensor([s.tokens[-1] for s in active]), device)
        positions = [s.pair.num_tokens + len(s.tokens) - 1 for s in active]
        window, sampled = [], _sampled(active)
        for _ in range(steps):
            logits = graphs.step(last, positions, slots) if graphs else net.decode_step(last, positions, pool, sel)
            last = self._pick(logits, sampled)
            window.append(last)
            positions = [p + 1 for p in positions]
        for s, new_tokens in zip(active, torch.stack(window, dim=1).tolist()):
            for tok in new_tokens:
                if len(s.tokens) >= s.max_new_tokens:
                    break
                s.tokens.append(tok)
                if tok in self._stop:
                    break
            s.done = s.tokens[-1] in self._stop or len(s.tokens) >= s.max_new_tokens
        return steps

    def _pick(self, logits: torch.Tensor, sampled: list[tuple[int, Sequence]]) -> torch.Tensor:
        """The next token of each row, on the logits' device. Greedy rows take the argmax in the logits' own
        dtype (a bf16 to float32 cast is exact, so the argmax is the same, and it skips a copy of B x
        vocabulary per step); each sampled row (k, seq) draws from its softmax at its temperature, with its
        own generator."""
        picked = logits.argmax(dim=-1)
        for k, s in sampled:
            probs = F.softmax(logits[k].float() / s.temperature, dim=-1)
            picked[k] = torch.multinomial(probs, 1, generator=s.generator)[0]
        return picked

    def text(self, seq: Sequence) -> str:
        return self.prompts.hf.decode(seq.tokens, skip_special_tokens=True)

    def result(self, seq: Sequence) -> EvidenceResult:
        prompts = self.loaded.prompts
        ended = seq.tokens[-1] in self._stop
        text = self.text(seq)
        parsed = parse_output(text)
        return EvidenceResult(
            score=sigmoid(seq.logit), logit=seq.logit, relevant=seq.tokens[0] == prompts.yes_id,
            contribution=parsed.contribution, evidence=parsed.evidence, text=text,
            truncated=not ended and len(seq.tokens) >= seq.max_new_tokens, num_tokens=seq.pair.num_tokens,
            prompt_truncated=seq.pair.truncated, generated_tokens=len(seq.tokens),
        )


def _sampled(seqs: list[Sequence]) -> list[tuple[int, Sequence]]:
    """The rows that sample (temperature > 0), found once per forward or decode window, not per step."""
    return [(k, s) for k, s in enumerate(seqs) if s.temperature > 0]


class DecodeLoop:
    """Sequences waiting for a slot and sequences decoding, over one `SlotPool`; `step` moves them on.

    Not thread-safe: one thread steps it (a generate call, or the scheduler's thread). Only `Sequence.cancelled`
    may be set from elsewhere; the loop honours it at its next step.
    """

    def __init__(self, engine: EvidenceEngine, slots: int, max_len: int):
        self.engine = engine
        self.pool = SlotPool(engine.loaded.net, slots, max_len)
        self.graphs = GraphedDecode(engine.loaded.net, self.pool) if engine.cuda_graphs else None
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self.admitting: list[Sequence] = []  # being prefilled in the current step
        self._prefixes: dict[str, SequenceState | None] = {}  # query -> prefix state, while a waiting pair needs it

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def pending(self) -> bool:
        return bool(self.waiting or self.active)

    @torch.inference_mode()
    def step(self) -> tuple[list[Sequence], list[Sequence], int]:
        """Retire what was cancelled, admit waiting sequences into free slots (their prefill packed), then one
        decode window for every active sequence. Returns the sequences that ended in this step (done or
        cancelled; their slots are free again), those that got their first token, and the decode steps run."""
        ended = self._retire(lambda s: s.cancelled)
        for s in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(s)
            ended.append(s)
        started = self._admit()
        ended += [s for s in started if s.done]
        steps = 0
        if self.active:
            steps = self.engine._decode(self.active, self.pool, self.graphs)
            ended += self._retire(lambda s: s.done)
        return ended, started, steps

    def _retire(self, which) -> list[Sequence]:
        out = [s for s in self.active if which(s)]
        for s in out:
            self.pool.release(s.slot)
        if out:
            self.active = [s for s in self.active if not which(s)]
        return out

    def _admit(self) -> list[Sequence]:
        """Waiting sequences into free slots, first come first served. While others decode, one round prefills
        at most `token_budget` prompt tokens (one sequence at least), so a burst of arrivals holds the running
        decode back by about one forward; into an idle pool it admits as many as there are free slots."""
        if not self.waiting or not self.pool.free:
            return []
        budget = self.engine.token_budget if self.active else float("inf")
        chosen: list[Sequence] = []
        tokens = 0
        while self.waiting and len(chosen) < self.pool.free:
            n = self.waiting[0].pair.num_tokens
            if chosen and tokens + n > budget:
                break
            chosen.append(self.waiting.popleft())
            tokens += n
        self.admitting = chosen
        self._contexts(chosen)
        self.engine._prefill(chosen)
        need = max(s.pair.num_tokens + s.max_new_tokens for s in chosen) + self.engine.sync_every
        if need > self.pool.max_len:
            self.pool.grow(max(need, 2 * self.pool.max_len))
        for s in chosen:
            if not s.done:
                s.slot = self.pool.allocate()
                self.pool.store(s.slot, s.state)
                self.active.append(s)
            s.state = None
        self.active.sort(key=lambda s: s.slot)  # consecutive slots read as a view
        self.admitting = []
        return chosen

    def _contexts(self, seqs: list[Sequence]) -> None:
        """Each sequence's query prefix state: every distinct query's prefix runs once (the new ones of a
        round in one forward) and is kept while a waiting pair of that query still needs it."""
        first: dict[str, Sequence] = {}
        for s in seqs:
            first.setdefault(s.query, s)
        new = [q for q in first if q not in self._prefixes]
        if new:
            states = self.engine.loaded.prefixes.states([first[q].pair.prefix for q in new])
            self._prefixes.update(zip(new, states))
        for s in seqs:
            s.context = self._prefixes[s.query]
        wanted = {s.query for s in self.waiting}
        self._prefixes = {q: st for q, st in self._prefixes.items() if q in wanted}

    def fail_running(self) -> list[Sequence]:
        """After a step raised: the sequences it was running (decoding or being admitted), out of the loop,
        their slots freed. The waiting ones stay."""
        out = self.active + self.admitting
        for s in self.active:
            self.pool.release(s.slot)
        self.active, self.admitting = [], []
        return out
