"""EvidenceEngine: the model's full answer (yes/no, contribution, evidence), generated per step from a slot pool.

Prefill: each query's shared prefix runs once (`prefix.PrefixCache`); the pairs' remaining tokens run packed
(no padding) in forwards of up to `token_budget` tokens, each row continuing from its query's prefix state,
and each row's state (attention K/V, Gated DeltaNet conv and recurrent state after its own last token) is
written into a slot of a preallocated `SlotPool`. Decode: every active slot advances one token per step, in
place; the host reads the new tokens every `sync_every` steps, retires rows at their stop token, their
`max_new_tokens` or their cancellation (freeing their slot, nothing else moves), and admits waiting pairs
into the free slots, so a call with more pairs than slots keeps the pool full and a short answer never waits
for a long one.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from prism_ray.engine.batching import packed_batches
from prism_ray.engine.loading import LoadedModel, load_model
from prism_ray.engine.models import SequenceState, SlotPool, pack
from prism_ray.engine.score import elapsed, sigmoid, validate_group
from prism_ray.engine.transfer import to_device
from prism_ray.output import parse_output
from prism_ray.prompt import DEFAULT_MAX_LENGTH, EncodedPair

DEFAULT_MAX_NEW_TOKENS = 512
# Prompt tokens per prefill forward (packed: real tokens); 1 runs each pair on its own. On a 2-core CPU,
# packed batches of 1024 beat one pair per forward (`benchmarks/bench_prefill.py --preset 0.8b`, see README).
DEFAULT_PREFILL_BUDGET = {"cpu": 1024, "cuda": 16384}


@dataclass(frozen=True)
class EvidenceResult:
    score: float
    logit: float
    relevant: bool  # the first generated token is "yes"
    contribution: str | None
    evidence: str | None
    text: str  # everything generated, special tokens removed
    truncated: bool  # generation was cut by max_new_tokens before the end of turn
    num_tokens: int  # prompt tokens
    prompt_truncated: bool  # the document was cut to fit max_length
    generated_tokens: int


@dataclass
class _Row:
    index: int  # the pair's position in the generate call
    pair: EncodedPair
    logit: float
    tokens: list[int]
    context: SequenceState | None = field(default=None, repr=False)  # its query's prefix state
    slot: int = -1
    done: bool = False
    state: SequenceState | None = field(default=None, repr=False)  # after prefill, until stored in the pool


class EvidenceEngine:
    def __init__(self, model: str | Path | LoadedModel, dtype: str | torch.dtype = "auto",
                 device: str | None = None, max_length: int = DEFAULT_MAX_LENGTH, max_batch_size: int = 32,
                 token_budget: int | None = None):
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype, device, max_length)
        self.max_batch_size = max_batch_size  # slots: pairs decoding at once
        # Prompt tokens per prefill forward.
        self.token_budget = token_budget or DEFAULT_PREFILL_BUDGET.get(self.loaded.device.type, 8192)
        self.sync_every = 8  # decode steps between host syncs (see _decode)
        p = self.loaded.prompts
        self._stop = set(p.eos_ids)

    @property
    def prompts(self):
        return self.loaded.prompts

    def warm_up(self) -> float:
        """A two-pair, two-token generation (prefill and decode), for the reason of `ScoreEngine.warm_up`."""
        return elapsed(lambda: self.generate([("warm-up query", "a warm-up document"), ("warm-up query", "another")],
                                            max_new_tokens=2, seed=0))

    @torch.inference_mode()
    def generate(self, pairs: Sequence[tuple[str, str]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, seed: int | None = None,
                 should_stop: Callable[[int], bool] | None = None) -> list[EvidenceResult]:
        """Answers for (query, document) pairs, in order. Greedy unless `temperature` > 0.

        `should_stop(i)` says that pair i's answer is no longer wanted (its caller left); it is asked at
        every host sync of the decode (every `sync_every` steps), and a stopped pair leaves there, its result
        holding what was generated until then. A server passes it so that a cancelled request stops costing
        decode steps at once instead of at `max_new_tokens`.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError("max_new_tokens must be an integer >= 1")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        for query, doc in pairs:
            validate_group(query, [doc])
        if not pairs:
            return []
        gen = torch.Generator(device=self.loaded.device)
        gen.manual_seed(seed if seed is not None else secrets.randbits(63))
        rows = self._encode(pairs)
        longest = max(r.pair.num_tokens for r in rows)
        pool = SlotPool(self.loaded.net, min(self.max_batch_size, len(rows)), longest + max_new_tokens + self.sync_every)
        waiting = deque(rows)
        active: list[_Row] = []
        while waiting or active:
            if waiting and pool.free:
                admitted = [waiting.popleft() for _ in range(min(pool.free, len(waiting)))]
                self._prefill(admitted, temperature, gen)
                for row in admitted:
                    if row.done or max_new_tokens == 1:
                        row.done = True
                        continue
                    row.slot = pool.allocate()
                    pool.store(row.slot, row.state)
                    row.state = None
                    active.append(row)
                active.sort(key=lambda r: r.slot)
            if active:
                self._decode(active, pool, max_new_tokens, temperature, gen)
                for row in active:
                    if not row.done and should_stop is not None and should_stop(row.index):
                        row.done = True
                    if row.done:
                        pool.release(row.slot)
                active = [r for r in active if not r.done]
        return [self._finish(row, max_new_tokens) for row in rows]

    def _encode(self, pairs) -> list[_Row]:
        """The pairs' prompts, each with its query's prefix state: every distinct query's prefix runs once per
        call (all of them in one forward), however many admission rounds its pairs are prefilled in."""
        prompts = self.loaded.prompts
        prefixes: dict[str, list[int]] = {}
        for query, _ in pairs:
            if query not in prefixes:
                prefixes[query] = prompts.prefix(query)
        states = dict(zip(prefixes, self.loaded.prefixes.states(list(prefixes.values()))))
        return [_Row(i, prompts.encode(q, d, prefix=prefixes[q]), 0.0, [], context=states[q]) for i, (q, d) in enumerate(pairs)]

    # -- prefill: packed rows, each from its query's prefix state ----------------------------------
    def _prefill(self, rows: list[_Row], temperature: float, gen) -> None:
        """Each row's first token, logit and state (`row.state`, for the pool)."""
        prompts, net = self.loaded.prompts, self.loaded.net
        tails = [r.pair.ids[(r.context.length if r.context is not None else 0):] for r in rows]
        for batch in packed_batches([len(t) for t in tails], self.token_budget):
            packed = pack([tails[k] for k in batch], [rows[k].context for k in batch], self.loaded.device)
            hidden, row_states = net.forward_rows(*packed, keep_states=True)
            logits = net.logits(hidden)
            firsts = self._pick(logits, temperature, gen).tolist()
            diffs = (logits[:, prompts.yes_id].float() - logits[:, prompts.no_id].float()).tolist()
            for k, first, diff, state in zip(batch, firsts, diffs, row_states):
                row = rows[k]
                row.tokens, row.logit, row.state, row.done = [first], diff, state, first in self._stop

    # -- decode: every active slot, one token per step --------------------------------------------
    def _decode(self, active: list[_Row], pool: SlotPool, max_new_tokens: int, temperature: float, gen) -> None:
        """Up to `sync_every` steps of every active row, then one transfer brings the new tokens to the host:
        a row that reached a stop token keeps only what precedes it (and its stop), one that reached
        `max_new_tokens` keeps that many, and both are marked done. A GPU never waits on the host per token;
        a finished row costs at most `sync_every - 1` extra steps of a batch that runs anyway."""
        net, device = self.loaded.net, self.loaded.device
        sel = pool.select([r.slot for r in active])
        steps = min(self.sync_every, max(max_new_tokens - len(r.tokens) for r in active))
        last = to_device(torch.tensor([r.tokens[-1] for r in active]), device)
        positions = [r.pair.num_tokens + len(r.tokens) - 1 for r in active]
        window = []
        for _ in range(steps):
            last = self._pick(net.decode_step(last, positions, pool, sel), temperature, gen)
            window.append(last)
            positions = [p + 1 for p in positions]
        for row, new_tokens in zip(active, torch.stack(window, dim=1).tolist()):
            for tok in new_tokens:
                if len(row.tokens) >= max_new_tokens:
                    break
                row.tokens.append(tok)
                if tok in self._stop:
                    break
            row.done = row.tokens[-1] in self._stop or len(row.tokens) >= max_new_tokens

    def _pick(self, logits: torch.Tensor, temperature: float, gen) -> torch.Tensor:
        """The next token of each row, on the logits' device. Greedy picks in the logits' own dtype (a bf16
        to float32 cast is exact, so the argmax is the same, and it skips a copy of B x vocabulary per step)."""
        if temperature == 0:
            return logits.argmax(dim=-1)
        probs = F.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]

    def _finish(self, row: _Row, max_new_tokens: int) -> EvidenceResult:
        prompts = self.loaded.prompts
        ended = row.tokens[-1] in self._stop
        text = prompts.hf.decode(row.tokens, skip_special_tokens=True)
        parsed = parse_output(text)
        return EvidenceResult(
            score=sigmoid(row.logit), logit=row.logit, relevant=row.tokens[0] == prompts.yes_id,
            contribution=parsed.contribution, evidence=parsed.evidence, text=text,
            truncated=not ended and len(row.tokens) >= max_new_tokens, num_tokens=row.pair.num_tokens,
            prompt_truncated=row.pair.truncated, generated_tokens=len(row.tokens),
        )
