"""EvidenceEngine: the model's full answer (yes/no, contribution, evidence), batched.

Each pair is prefilled on its own, continuing from its query's shared prefix state: batching
prefills would put pads into the recurrent state. The per-pair caches are then merged into one
batch for decoding: attention K/V are left-padded to a common length and masked, the Gated
DeltaNet states (fixed size) are stacked, and every row keeps its own position ids. Finished rows
leave the batch, so one long answer does not make short ones pay.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prism_ray.engine.cache_ops import merge
from prism_ray.engine.loading import LoadedModel, expand_state, load_model, prefix_state
from prism_ray.engine.scope import engine_kernels
from prism_ray.engine.score import sigmoid, validate_group
from prism_ray.output import parse_output
from prism_ray.prompt import DEFAULT_MAX_LENGTH, EncodedPair

DEFAULT_MAX_NEW_TOKENS = 512


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
    pair: EncodedPair
    logit: float
    tokens: list[int]
    done: bool = False


class EvidenceEngine:
    def __init__(self, model: str | Path | LoadedModel, dtype: str | torch.dtype = "auto",
                 device: str | None = None, max_length: int = DEFAULT_MAX_LENGTH, max_batch_size: int = 32):
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype, device, max_length)
        self.max_batch_size = max_batch_size
        self.sync_every = 8  # decode steps between host syncs (see _decode)
        p = self.loaded.prompts
        self._stop = set(p.eos_ids)

    @property
    def prompts(self):
        return self.loaded.prompts

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
            stopped = (lambda k, chunk=chunk: should_stop(chunk[k])) if should_stop is not None else None
            with engine_kernels():
                rows, caches = self._prefill([pairs[i] for i in chunk], temperature, gen)
                self._decode(rows, caches, max_new_tokens, temperature, gen, stopped)
            for i, row in zip(chunk, rows):
                results[i] = self._finish(row, max_new_tokens)
        return results  # type: ignore[return-value]

    # -- prefill: one pair at a time, from its query's prefix state ---------------------------------
    def _prefill(self, pairs, temperature, gen):
        prompts, lm = self.loaded.prompts, self.loaded.model
        prefixes: dict[str, tuple[list[int], object]] = {}
        rows, caches = [], []
        for query, doc in pairs:
            if query not in prefixes:
                ids = prompts.prefix(query)
                prefixes[query] = (ids, prefix_state(self.loaded, ids))
            prefix, state = prefixes[query]
            pair = prompts.encode(query, doc, prefix=prefix)
            cache = expand_state(state, 1)
            tail = torch.tensor([state.tail(pair.ids)], device=self.loaded.device)
            positions = torch.arange(state.cached_len, pair.num_tokens, device=self.loaded.device)[None]
            out = lm(input_ids=tail, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[0, -1].float()
            logit = (logits[prompts.yes_id] - logits[prompts.no_id]).item()
            rows.append(_Row(pair, logit, [int(self._pick(logits[None], temperature, gen)[0])]))
            caches.append(cache)
        for row in rows:
            row.done = row.tokens[-1] in self._stop
        return rows, caches

    # -- decode: all unfinished rows together ----------------------------------------------------
    def _decode(self, rows: list[_Row], caches: list, max_new_tokens: int, temperature: float, gen,
                stopped: Callable[[int], bool] | None = None) -> None:
        """Tokens stay on the device between syncs: every `sync_every` steps one transfer brings the new
        tokens to the host, rows that reached a stop token keep only what precedes it (and their stop)
        and leave the batch. A GPU never waits on the host per token; a finished row costs at most
        `sync_every - 1` extra steps of a batch that runs anyway."""
        active = [i for i, r in enumerate(rows) if not r.done]
        if not active or max_new_tokens <= 1:
            return
        lengths = [rows[i].pair.num_tokens for i in active]
        cache, mask = merge([caches[i] for i in active], lengths)
        device = self.loaded.device
        mask = mask.to(device)
        positions = torch.tensor(lengths, device=device)
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
