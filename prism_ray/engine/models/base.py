"""The decoder stack the engines run, in plain PyTorch over a checkpoint's own weight tensors.

What every backbone shares lives here: packed rows (`Rows`), the state a sequence leaves behind
(`SequenceState`), the decode slot pool (`SlotPool`), rope, full attention (with Qwen3.5's output gate as an
option), the MLP and the stack itself (`Model`). What a family adds or changes (its norm, its rotary width,
its linear-attention layer, the chunk alignment of cached states) is a `Family` built by that backbone's
module (`qwen3_5.py`, `qwen3.py`).

Two entry points, as gpt-fast's prefill and decode_one_token:

- `Model.forward_rows`: the rows of a call as one flat token stream (no padding), each row continuing from
  its own context state (attention reads the context's K/V, a linear-attention row starts from the context's
  recurrent and conv state). Rows are grouped by context (`Rows.groups`): rows that all share one context
  read it through a broadcast view; otherwise each distinct context is stacked once per layer and read by
  index, which copies it per row only where a kernel wants a per-row layout (`Rows.per_row`). With
  `last_only`, the last layer runs only where a row's last token needs it (a last attention layer still
  computes every token's K/V when `keep_states` asks for them). With `keep_states`, each row's state is
  returned. The kernels (prefill attention, the gated delta rule, the convolution) are chosen at
  load (`kernels.py`).
- `Model.decode_step`: one token for each of some slots of a `SlotPool`, whose K/V and linear-attention
  states are written in place; `Model.decode_tensors` is the same step over device tensors only, what a CUDA
  graph captures (`graphs.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from prism_ray.engine import pointwise
from prism_ray.engine.transfer import ragged_arange, to_device

Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# (q, k, v, rows, layer index, last_only, row states or None) -> attention output: a prefill kernel of `engine.attention`
Attend = Callable[..., torch.Tensor]


# -- states ------------------------------------------------------------------------------------------------
@dataclass
class AttentionState:
    k: torch.Tensor  # (kv_heads, length, head_dim), normed and rotated
    v: torch.Tensor


@dataclass
class LinearState:
    conv: torch.Tensor  # (kernel - 1, channels): the last inputs of the short convolution
    recurrent: torch.Tensor  # (v_heads, k_dim, v_dim) float32


@dataclass
class SequenceState:
    """What a sequence of `length` tokens leaves for the tokens after it: one entry per layer."""

    length: int
    layers: list[AttentionState | LinearState]


# -- packed rows -------------------------------------------------------------------------------------------
@dataclass
class Rows:
    """Rows of tokens packed one after another; row i continues from `contexts[i]` (None: from nothing)."""

    lengths: list[int]
    contexts: list[SequenceState | None]
    device: torch.device
    cu: list[int] = field(init=False)  # row i is tokens cu[i]:cu[i + 1] of the stream
    positions: torch.Tensor = field(init=False)  # (T,) on the device
    last: torch.Tensor = field(init=False)  # (rows,) each row's last token in the stream
    _cache: dict = field(init=False, default_factory=dict)

    groups: list[SequenceState] = field(init=False)  # the distinct contexts, in order of first use
    group_of: list[int] = field(init=False)  # row i's context is groups[group_of[i]]; -1: none

    def __post_init__(self):
        if any(n < 1 for n in self.lengths):
            raise ValueError("every row needs at least one token")
        self.cu = [0]
        for n in self.lengths:
            self.cu.append(self.cu[-1] + n)
        starts = [0 if c is None else c.length for c in self.contexts]
        positions = ragged_arange(starts, self.lengths)
        self.positions = to_device(positions, self.device)
        self.last = to_device(torch.tensor(self.cu[1:]) - 1, self.device)
        seen: dict[int, int] = {}
        self.groups, self.group_of = [], []
        for c in self.contexts:
            if c is not None and id(c) not in seen:
                seen[id(c)] = len(self.groups)
                self.groups.append(c)
            self.group_of.append(-1 if c is None else seen[id(c)])

    def __len__(self) -> int:
        return len(self.lengths)

    def cached(self, key, build):
        """Per-call values that several layers use (gather indices, masks), built once."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def per_row(self, values: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
        """(rows, ...): each row's entry of `values` (one per context group), `empty` for a row without a
        context. Rows that all share one context get a broadcast view, not a copy per row."""
        if len(values) == 1 and -1 not in self.group_of:
            return values[0].expand(len(self), *values[0].shape)

        def index():
            return to_device(torch.tensor([g if g >= 0 else len(self.groups) for g in self.group_of]), self.device)

        return torch.stack([*values, empty]).index_select(0, self.cached("group_index", index))

    def cu_seqlens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The row offsets as variable-length kernels take them: (on the device, on the host), int64."""
        return self.cached("cu_seqlens", lambda: (to_device(torch.tensor(self.cu), self.device), torch.tensor(self.cu)))


def pack(rows: list[list[int]], contexts: list[SequenceState | None], device: torch.device) -> tuple[torch.Tensor, Rows]:
    """Token rows as one flat id stream on the device and its `Rows`: what `Model.forward_rows` takes."""
    ids = to_device(torch.tensor([t for row in rows for t in row], dtype=torch.long), device)
    return ids, Rows([len(r) for r in rows], contexts, device)


class SlotPool:
    """Preallocated decode state for `slots` sequences of up to `max_len` tokens: K/V per attention layer,
    conv and recurrent state per linear-attention layer, all indexed by slot and written in place. A slot
    that ends is freed for the next sequence; nothing else moves."""

    def __init__(self, model: Model, slots: int, max_len: int):
        self.slots, self.max_len = slots, max_len
        self._free = list(range(slots - 1, -1, -1))
        self.layers = [layer.mixer.empty_pool(slots, max_len) for layer in model.layers]
        self.device = model.device

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free slot")
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)
        self._free.sort(reverse=True)  # lowest first: the active slots stay a compact range

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def free_slots(self) -> list[int]:
        return list(self._free)

    def store(self, slot: int, state: SequenceState) -> None:
        """Write a sequence's state (a prefill's output) into `slot`."""
        if state.length > self.max_len:
            raise ValueError(f"sequence of {state.length} tokens is longer than the pool's {self.max_len}")
        for pool, layer_state in zip(self.layers, state.layers):
            pool.store(slot, layer_state)

    def grow(self, max_len: int) -> None:
        """Room for sequences of up to `max_len` tokens: attention K/V move into longer buffers (the slots'
        contents kept); fixed-size linear-attention states stay where they are. A long-lived pool starts
        short and grows, rarely (the decode loop doubles it), to the longest sequence it has been asked for."""
        if max_len > self.max_len:
            for pool in self.layers:
                pool.grow(max_len)
            self.max_len = max_len

    def select(self, slots: list[int]) -> SlotSelection:
        return SlotSelection(slots, self.device)


class SlotSelection:
    """Some slots of a pool: a slice where they are consecutive (views, no copy), an index otherwise."""

    def __init__(self, slots: list[int], device: torch.device):
        lo = slots[0]
        self.range = slice(lo, lo + len(slots)) if slots == list(range(lo, lo + len(slots))) else None
        self.index = to_device(torch.tensor(slots), device)  # for writes at (slot, position)

    @classmethod
    def leading(cls, index: torch.Tensor) -> SlotSelection:
        """Slots 0..b-1 with `index` = their arange on the device, made once: a CUDA graph's selection, which
        must not copy from the host while it is captured."""
        sel = cls.__new__(cls)
        sel.range, sel.index = slice(0, len(index)), index
        return sel

    def read(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.range] if self.range is not None else t.index_select(0, self.index)

    def write(self, t: torch.Tensor, value: torch.Tensor) -> None:
        """Store a new `value` in the selected slots."""
        if self.range is None:
            t.index_copy_(0, self.index, value)
        else:
            t[self.range].copy_(value)

    def write_back(self, t: torch.Tensor, value: torch.Tensor) -> None:
        """Store what `read` returned, updated in place: already there when `read` returned a view."""
        if self.range is None:
            t.index_copy_(0, self.index, value)


# -- shared pieces -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """What a backbone family decides for the shared pieces."""

    name: str
    norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (x, scale, eps)
    # a norm's checkpoint weight -> the scale `norm` takes, computed once at load (for Qwen3.5's zero-centred
    # norms 1 + w in float32), so a forward does not redo it at every norm
    norm_scale: Callable[[torch.Tensor], torch.Tensor]
    rotary_dim: int
    rope_theta: float
    gated_attention: bool  # Qwen3.5: q_proj also yields a sigmoid gate on the attention output
    chunk_align: int  # a cached state must end at a multiple of this (64 with linear attention, else 1)
    eps: float


def rope_tables(family: Family, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, rotary_dim) for the positions, computed in float32 and cast as transformers does."""
    dim = family.rotary_dim
    inv_freq = 1.0 / (family.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    freqs = positions[:, None].float() * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class MLP:
    def __init__(self, w: dict[str, torch.Tensor], linear: Linear, run=pointwise.eager):
        self.gate, self.up, self.down, self.linear = w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"], linear
        self.act = run(pointwise.silu_mul)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.linear
        return lin(self.act(lin(x, self.gate, None), lin(x, self.up, None)), self.down, None)


class Attention:
    """Full (softmax) attention with grouped K/V heads, per-head q/k norms and rope; Qwen3.5's output gate."""

    def __init__(self, w: dict[str, torch.Tensor], family: Family, linear: Linear, heads: int, kv_heads: int, head_dim: int,
                 attend: Attend, run=pointwise.eager):
        p = "self_attn."
        self.attend = attend  # the prefill kernel (`attention.PREFILL`)
        self.q, self.k, self.v, self.o = (w[f"{p}{n}_proj.weight"] for n in "qkvo")
        self.qb, self.kb, self.vb, self.ob = (w.get(f"{p}{n}_proj.bias") for n in "qkvo")
        self.q_norm, self.k_norm = family.norm_scale(w[f"{p}q_norm.weight"]), family.norm_scale(w[f"{p}k_norm.weight"])
        self.family, self.linear = family, linear
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self._q, self._k, self._gate = run(pointwise.query_heads), run(pointwise.key_heads), run(pointwise.sigmoid_gate)

    def _query(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(T, heads, head_dim) normed, rotated queries, and the output gate (T, heads * head_dim) or None."""
        f = self.family
        return self._q(self.linear(x, self.q, self.qb), self.q_norm, cos, sin, f.norm, f.eps, self.heads, f.gated_attention)

    def _key_value(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.family
        k = self._k(self.linear(x, self.k, self.kb), self.k_norm, cos, sin, f.norm, f.eps, self.kv_heads)
        return k, self.linear(x, self.v, self.vb).view(len(x), self.kv_heads, self.head_dim)

    def _out(self, attn: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        attn = attn.reshape(len(attn), -1)
        if gate is not None:
            attn = self._gate(attn, gate)
        return self.linear(attn, self.o, self.ob)

    def prefill(self, x: torch.Tensor, rows: Rows, index: int, rope, keep_states: bool, last_only: bool = False):
        """Output (T, hidden), or (rows, hidden) at each row's last token with `last_only`; and the rows'
        states (context K/V followed by the row's) with `keep_states`."""
        cos, sin = rope
        k, v = self._key_value(x, cos, sin)
        if last_only:
            q, gate = self._query(x[rows.last], cos[rows.last], sin[rows.last])
        else:
            q, gate = self._query(x, cos, sin)
        states = self._states(k, v, rows, index) if keep_states else None
        return self._out(self.attend(q, k, v, rows, index, last_only, states), gate), states

    @staticmethod
    def _states(k: torch.Tensor, v: torch.Tensor, rows: Rows, index: int) -> list[AttentionState]:
        states = []
        for i, ctx in enumerate(rows.contexts):
            ki, vi = k[rows.cu[i]:rows.cu[i + 1]].transpose(0, 1), v[rows.cu[i]:rows.cu[i + 1]].transpose(0, 1)
            if ctx is not None:
                c = ctx.layers[index]
                ki, vi = torch.cat([c.k, ki], dim=1), torch.cat([c.v, vi], dim=1)
            states.append(AttentionState(ki, vi))
        return states

    def decode(self, x: torch.Tensor, positions: torch.Tensor, sel: SlotSelection, pool, rope, width: int) -> torch.Tensor:
        """One token per selected slot, at `positions`; its K/V written into the pool. `width`: keys to read
        (the longest selected sequence, the new token included)."""
        cos, sin = rope
        q, gate = self._query(x, cos, sin)
        k, v = self._key_value(x, cos, sin)
        pool.k[sel.index, :, positions] = k
        pool.v[sel.index, :, positions] = v
        keys, values = sel.read(pool.k[:, :, :width]), sel.read(pool.v[:, :, :width])
        mask = (torch.arange(width, device=x.device)[None] <= positions[:, None])[:, None, None]
        # The query heads that share a K/V head go in as that head's query rows: (A, kv_heads, group, d)
        # against (A, kv_heads, width, d), so no kernel needs grouped heads or copies K/V per query head.
        grouped = q.view(len(q), self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
        return self._out(out.reshape(len(q), self.heads, self.head_dim), gate)

    def empty_pool(self, slots: int, max_len: int):
        return AttentionPool(slots, self.kv_heads, max_len, self.head_dim, self.k.dtype, self.k.device)


class AttentionPool:
    def __init__(self, slots, kv_heads, max_len, head_dim, dtype, device):
        self.k = torch.zeros(slots, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def grow(self, max_len: int) -> None:
        self.k, self.v = _longer(self.k, max_len), _longer(self.v, max_len)

    def store(self, slot: int, state: AttentionState) -> None:
        n = state.k.shape[1]
        self.k[slot, :, :n] = state.k
        self.v[slot, :, :n] = state.v

    def step_writes(self, b: int) -> list[torch.Tensor]:
        """What a decode step of slots 0..b-1 at position 0 writes (views)."""
        return [self.k[:b, :, 0], self.v[:b, :, 0]]


def _longer(t: torch.Tensor, max_len: int) -> torch.Tensor:
    """(slots, kv_heads, n, head_dim) K or V copied into a buffer of `max_len` positions."""
    out = t.new_zeros(t.shape[0], t.shape[1], max_len, t.shape[3])
    out[:, :, : t.shape[2]] = t
    return out


# -- the stack ---------------------------------------------------------------------------------------------
class DecoderLayer:
    def __init__(self, w: dict[str, torch.Tensor], family: Family, mixer, linear: Linear, run=pointwise.eager):
        self.input_norm, self.post_norm = (family.norm_scale(w[f"{n}.weight"]) for n in ("input_layernorm", "post_attention_layernorm"))
        self.mixer, self.mlp, self.family = mixer, MLP(w, linear, run), family


class Model:
    """A decoder-only backbone with its two heads: the LM head (generation) and the score vector
    w_yes - w_no (scoring needs two logits, never the vocabulary). `run` runs the pointwise chains
    (`pointwise.RUN`); each residual add is fused with the norm after it."""

    def __init__(self, family: Family, embed: torch.Tensor, layers: list[DecoderLayer], norm: torch.Tensor,
                 lm_head: torch.Tensor, linear: Linear, run=pointwise.eager):
        norm = family.norm_scale(norm)
        self.family, self.embed, self.layers, self.norm, self.lm_head, self.linear = family, embed, layers, norm, lm_head, linear
        self.device, self.dtype = embed.device, embed.dtype
        self.score_vector: torch.Tensor | None = None
        self._norm, self._add = run(family.norm), run(pointwise.add_norm)
        # the norm after layer i's MLP: the next layer's input norm, or the final norm
        self._after = [layer.input_norm for layer in layers[1:]] + [norm]

    def set_score_tokens(self, yes_id: int, no_id: int) -> None:
        self.score_vector = (self.lm_head[yes_id] - self.lm_head[no_id]).float()

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor):
        return self._add(x, delta, weight, self.family.norm, self.family.eps)

    def forward_rows(self, ids: torch.Tensor, rows: Rows, keep_states: bool = False,
                     last_only: bool = True) -> tuple[torch.Tensor, list[SequenceState] | None]:
        """Final-normed hidden states at each row's last token (rows, hidden), and with `keep_states` each
        row's state after its last token. `ids` (T,) on the device."""
        x = F.embedding(ids, self.embed)
        rope = rope_tables(self.family, rows.positions, self.dtype)
        per_layer = []
        h = self._norm(x, self.layers[0].input_norm, self.family.eps)
        for index, layer in enumerate(self.layers):
            final = index == len(self.layers) - 1
            if final and last_only and isinstance(layer.mixer, Attention):
                # Its K/V (the state) come from every token; its queries and attention, only from the last.
                mixed, states = layer.mixer.prefill(h, rows, index, rope, keep_states, last_only=True)
                if keep_states:
                    per_layer.append(states)
                x = x[rows.last]
            else:
                mixed, states = layer.mixer.prefill(h, rows, index, rope, keep_states)
                per_layer.append(states)
                if final and last_only:
                    x, mixed = x[rows.last], mixed[rows.last]
            x, h = self._add_norm(x, mixed, layer.post_norm)
            x, h = self._add_norm(x, layer.mlp(h), self._after[index])
        hidden = h if last_only else h[rows.last]
        if not keep_states:
            return hidden, None
        starts = [0 if c is None else c.length for c in rows.contexts]
        return hidden, [SequenceState(s + n, [states[i] for states in per_layer]) for i, (s, n) in enumerate(zip(starts, rows.lengths))]

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """l_yes - l_no (float32) for final hidden states."""
        return hidden.float() @ self.score_vector

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden, self.lm_head, None)

    def decode_step(self, tokens: torch.Tensor, positions: list[int], pool: SlotPool, sel: SlotSelection) -> torch.Tensor:
        """Logits (len(slots), vocab) after feeding `tokens[k]` (on the device) at `positions[k]` (host) to the
        k-th selected slot. Positions are known on the host, so a step never waits for the device."""
        if max(positions) >= pool.max_len:
            raise ValueError(f"position {max(positions)} is past the slot pool's {pool.max_len} tokens")
        pos = to_device(torch.tensor(positions), self.device)
        return self.decode_tensors(tokens, pos, pool, sel, max(positions) + 1)

    def decode_tensors(self, tokens: torch.Tensor, pos: torch.Tensor, pool: SlotPool, sel: SlotSelection,
                       width: int) -> torch.Tensor:
        """`decode_step` over device tensors only (positions `pos`, keys read up to `width`): no host value
        is read, so a CUDA graph can capture it (`graphs.py`)."""
        x = F.embedding(tokens, self.embed)
        rope = rope_tables(self.family, pos, self.dtype)
        h = self._norm(x, self.layers[0].input_norm, self.family.eps)
        for index, (layer, layer_pool) in enumerate(zip(self.layers, pool.layers)):
            x, h = self._add_norm(x, layer.mixer.decode(h, pos, sel, layer_pool, rope, width), layer.post_norm)
            x, h = self._add_norm(x, layer.mlp(h), self._after[index])
        return self.logits(h)
