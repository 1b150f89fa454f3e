"""EvidenceEngine: the model's full answer (yes/no, contribution, evidence), batched.

Prefill: each query's shared prefix runs once; the pairs' remaining tokens run as right-padded
batches of up to `token_budget` tokens, each row continuing from its query's prefix state (rows of
several queries share a batch as in ScoreEngine). Pads must not reach the state a row decodes from:
attention K/V slots of pads are masked for the rest of the generation, and the Gated DeltaNet scan
and short convolution are told where each row ends (`gated_delta.rows_end_at`,
`cache_ops.conv_states_end_at`), so each row's recurrent and conv states are those after its own
last real token. Decode: the batches' caches are merged into one (K/V left-padded, masks kept with
their holes, Gated DeltaNet states stacked), every row keeps its own position ids, and finished rows
leave the batch, so one long answer does not make short ones pay.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prism_ray.engine.batching import budget_batches
from prism_ray.engine.cache_ops import concat, conv_states_end_at
from prism_ray.engine.gated_delta import rows_end_at
from prism_ray.engine.loading import LoadedModel, PrefixState, continue_rows, load_model, prefix_states
from prism_ray.engine.scope import engine_kernels
from prism_ray.engine.score import elapsed, sigmoid, validate_group
from prism_ray.engine.transfer import to_device
from prism_ray.output import parse_output
from prism_ray.prompt import DEFAULT_MAX_LENGTH, EncodedPair

DEFAULT_MAX_NEW_TOKENS = 512
# Padded prompt tokens per prefill forward; 1 runs each pair on its own. On a 2-core CPU one pair per
# forward was the fastest (`benchmarks/bench_prefill.py --preset 0.8b`, 8 pairs, best of 3: bf16 4.67 s
# against 4.79 s at 1024 tokens and 4.91 s at 4096; fp32 6.58 s against 7.15 s and 7.32 s): a CPU is busy
# with one pair's ~200 tokens, and a batch adds pads and a masked attention. A GPU needs the batch to be
# busy at all (not measured on one yet).
DEFAULT_PREFILL_BUDGET = {"cpu": 1, "cuda": 16384}


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
    index: int  # the pair's position in the generate call's chunk (rows are in the cache's order)
    pair: EncodedPair
    logit: float
    tokens: list[int]
    done: bool = False


class EvidenceEngine:
    def __init__(self, model: str | Path | LoadedModel, dtype: str | torch.dtype = "auto",
                 device: str | None = None, max_length: int = DEFAULT_MAX_LENGTH, max_batch_size: int = 32,
                 token_budget: int | None = None):
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype, device, max_length)
        self.max_batch_size = max_batch_size
        # Padded prompt tokens per prefill forward (the decode batch is `max_batch_size` rows).
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
        every host sync of the decode (every `sync_every` steps), and a stopped pair leaves the batch
        there, its result holding what was generated until then. A server passes it so that a cancelled request stops
        costing decode steps at once instead of at `max_new_tokens`.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError("max_new_tokens must be an integer >= 1")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        for query, doc in pairs:
            validate_group(query, [doc])
        gen = torch.Generator(device=self.loaded.device)
        gen.manual_seed(seed if seed is not None else secrets.randbits(63))
        results: list[EvidenceResult | None] = [None] * len(pairs)
        for start in range(0, len(pairs), self.max_batch_size):
            chunk = list(range(start, min(start + self.max_batch_size, len(pairs))))
            with engine_kernels():
                rows, cache, mask = self._prefill([pairs[i] for i in chunk], temperature, gen)
                stopped = ((lambda k, chunk=chunk, rows=rows: should_stop(chunk[rows[k].index]))
                           if should_stop is not None else None)
                self._decode(rows, cache, mask, max_new_tokens, temperature, gen, stopped)
            for row in rows:
                results[chunk[row.index]] = self._finish(row, max_new_tokens)
        return results  # type: ignore[return-value]

    # -- prefill: right-padded batches of pairs, each row from its query's prefix state ---------------
    def _prefill(self, pairs, temperature, gen):
        """Rows with their first token, and one cache (with its mask) holding every row's state. Row k of the
        list is row k of the cache; both are in the prefill batches' order (`_Row.index` says which pair), so
        the batches' caches are concatenated once and never reordered."""
        prompts = self.loaded.prompts
        prefixes: dict[str, int] = {}
        for query, _ in pairs:
            prefixes.setdefault(query, len(prefixes))
        prefix_ids = [prompts.prefix(q) for q in prefixes]
        states = prefix_states(self.loaded, prefix_ids)
        encoded = [prompts.encode(q, d, prefix=prefix_ids[prefixes[q]]) for q, d in pairs]
        slots = [prefixes[q] for q, _ in pairs]
        tails = [states[s].tail(p.ids) for s, p in zip(slots, encoded)]
        rows: list[_Row] = []
        caches, masks = [], []
        for batch in budget_batches([len(t) for t in tails], self.token_budget):
            cache, mask, logits = self._prefill_batch(states, [slots[i] for i in batch], [tails[i] for i in batch])
            firsts = self._pick(logits, temperature, gen).tolist()
            diffs = (logits[:, prompts.yes_id].float() - logits[:, prompts.no_id].float()).tolist()
            rows.extend(_Row(i, encoded[i], diff, [first], done=first in self._stop)
                        for i, first, diff in zip(batch, firsts, diffs))
            caches.append(cache)
            masks.append(mask)
        cache, mask = concat(caches, masks) if len(caches) > 1 else (caches[0], masks[0])
        return rows, cache, mask

    def _prefill_batch(self, states: list[PrefixState], slots: list[int], tails: list[list[int]]):
        """One forward over right-padded tails; returns the cache, its (rows, slots) mask (0 at left pads of
        the merged prefixes and at the right pads), and the logits at each row's last real token."""
        device = self.loaded.device
        batch = continue_rows(self.loaded, states, slots, tails)
        ends, width = batch.ends, batch.ids.shape[1]
        prefix_mask = batch.prefix_mask if batch.prefix_mask is not None else torch.ones(len(tails), batch.cached_len,
                                                                                          dtype=torch.long)
        mask = torch.cat([prefix_mask, (torch.arange(width)[None] < ends[:, None]).long()], dim=1)
        padded = bool((ends < width).any())
        with rows_end_at(ends) if padded else contextlib.nullcontext(), \
                conv_states_end_at(batch.cache, ends) if padded else contextlib.nullcontext():
            needs_mask = padded or batch.prefix_mask is not None
            hidden = self.loaded.backbone(input_ids=batch.ids, position_ids=batch.positions, cache=batch.cache,
                                          attention_mask=to_device(mask, device) if needs_mask else None,
                                          use_cache=True).last_hidden_state
        last = hidden[torch.arange(len(tails), device=device), to_device(ends - 1, device)]
        return batch.cache, mask, self.loaded.model.get_output_embeddings()(last)

    # -- decode: all unfinished rows together ----------------------------------------------------
    def _decode(self, rows: list[_Row], cache, mask: torch.Tensor, max_new_tokens: int, temperature: float, gen,
                stopped: Callable[[int], bool] | None = None) -> None:
        """Tokens stay on the device between syncs: every `sync_every` steps one transfer brings the new
        tokens to the host, rows that reached a stop token keep only what precedes it (and their stop)
        and leave the batch. A GPU never waits on the host per token; a finished row costs at most
        `sync_every - 1` extra steps of a batch that runs anyway."""
        active = [i for i, r in enumerate(rows) if not r.done]
        if not active or max_new_tokens <= 1:
            return
        device = self.loaded.device
        mask = mask.to(device)
        if len(active) < len(rows):
            index = torch.tensor(active, device=device)
            cache.reorder_cache(index)
            mask = mask[index]
        positions = torch.tensor([rows[i].pair.num_tokens for i in active], device=device)
        last = torch.tensor([rows[i].tokens[-1] for i in active], device=device)
        remaining = max_new_tokens - 1
        while remaining > 0 and active:
            window = []
            for _ in range(min(self.sync_every, remaining)):
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
                out = self.loaded.model(input_ids=last[:, None], attention_mask=mask, position_ids=positions[:, None],
                                        cache=cache, use_cache=True, logits_to_keep=1)
                last = self._pick(out.logits[:, -1], temperature, gen)
                window.append(last)
                positions = positions + 1
            remaining -= len(window)
            keep = []
            for k, (i, new_tokens) in enumerate(zip(active, torch.stack(window, dim=1).tolist())):
                for tok in new_tokens:
                    rows[i].tokens.append(tok)
                    if tok in self._stop:
                        rows[i].done = True
                        break
                if not rows[i].done and not (stopped is not None and stopped(i)):
                    keep.append(k)
            if len(keep) < len(active) and keep:
                index = torch.tensor(keep, device=device)
                cache.reorder_cache(index)
                mask, positions, last = mask[index], positions[index], last[index]
            active = [active[k] for k in keep]

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
