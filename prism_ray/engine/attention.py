"""Full attention over packed rows (prefill), each row after its own context's K/V: the kernels to choose from.

Every function here takes the call's queries `q` (T, heads, d), or (rows, heads, d) at each row's last token
with `last_only`, and its keys and values `k`, `v` (T, kv_heads, d), normed and rotated (and, where the caller
keeps them, each row's states: its context's K/V and its own), and returns the attention output in `q`'s
shape. Row i's tokens attend to its context's K/V (`rows.contexts[i]`, layer `index`)
and causally to its own.

- `sdpa` (`rows`): one SDPA call per row (the context's K/V concatenated in front of the row's own). No padding, but a
  host round of launches per row: right for a CPU, where launches are cheap and padded work is not.
- `padded`: one SDPA call for all rows, right-padded to the longest row, behind the contexts' K/V padded to
  the longest context, with a mask. A constant number of launches per layer whatever the row count: what a
  GPU wants. Each distinct context's K/V is padded once per layer and read by index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from prism_ray.engine.transfer import ragged_arange, to_device


def sdpa(q, k, v, mask, causal: bool) -> torch.Tensor:
    """q (heads, n, d) against k/v (kv_heads, m, d)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=causal and mask is None,
                                          enable_gqa=True)[0]


def rows(q, k, v, packed, index: int, last_only: bool, states=None) -> torch.Tensor:
    """`states`: each row's K/V with its context's in front (`Attention._states`), when the caller keeps them
    anyway: read instead of concatenated a second time."""
    out = torch.empty_like(q)
    for i, ctx in enumerate(packed.contexts):
        lo, hi = packed.cu[i], packed.cu[i + 1]
        if states is not None:
            ki, vi = states[i].k, states[i].v
        else:
            ki, vi = k[lo:hi].transpose(0, 1), v[lo:hi].transpose(0, 1)
            if ctx is not None:
                c = ctx.layers[index]
                ki, vi = torch.cat([c.k, ki], dim=1), torch.cat([c.v, vi], dim=1)
        past = ki.shape[1] - (hi - lo)
        if last_only:
            out[i] = sdpa(q[i:i + 1].transpose(0, 1), ki, vi, None, False)[:, 0]
            continue
        qi = q[lo:hi].transpose(0, 1)
        mask = None
        if past:
            mask = torch.arange(ki.shape[1], device=q.device)[None] <= (past + torch.arange(hi - lo, device=q.device))[:, None]
        out[lo:hi] = sdpa(qi, ki, vi, mask, not past).transpose(0, 1)
    return out


@dataclass
class PadLayout:
    """Where packed rows lie in a (rows, width) padded grid, and the masks over [context | own] keys."""

    flat: torch.Tensor  # (T,) token t's place in the flat (rows * width) grid
    width: int  # the longest row
    context_width: int  # the longest context
    context_lengths: torch.Tensor  # (rows,) on the device
    lengths: torch.Tensor  # (rows,) on the device
    _masks: dict = field(default_factory=dict)

    @staticmethod
    def of(packed) -> PadLayout:
        lengths = packed.lengths
        width = max(lengths)
        contexts = [0 if c is None else c.length for c in packed.contexts]
        dev = packed.device
        return PadLayout(to_device(ragged_arange([i * width for i in range(len(lengths))], lengths), dev), width,
                         max(contexts), to_device(torch.tensor(contexts), dev), to_device(torch.tensor(lengths), dev))

    def mask(self, last_only: bool) -> torch.Tensor:
        """(rows, 1, queries, context_width + width), built on the device from the lengths (once per call):
        with `last_only` each row's last token's keys, else every own token's (causal)."""
        if last_only not in self._masks:
            dev = self.lengths.device
            ctx = torch.arange(self.context_width, device=dev)[None] < self.context_lengths[:, None]  # (rows, C)
            own = torch.arange(self.width, device=dev)
            rows = len(self.lengths)
            if last_only:
                mask = torch.cat([ctx, own[None] < self.lengths[:, None]], dim=1)[:, None, None]
            else:
                causal = (own[None] <= own[:, None])[None].expand(rows, -1, -1)
                mask = torch.cat([ctx[:, None].expand(-1, self.width, -1), causal], dim=2)[:, None]
            self._masks[last_only] = mask
        return self._masks[last_only]


def _to_grid(x: torch.Tensor, lay: PadLayout, count: int) -> torch.Tensor:
    """(T, heads, d) packed -> (rows, heads, width, d) right-padded with zeros."""
    grid = x.new_zeros(count * lay.width, *x.shape[1:])
    grid.index_copy_(0, lay.flat, x)
    return grid.view(count, lay.width, *x.shape[1:]).transpose(1, 2)


def _context_grid(packed, index: int, lay: PadLayout, which: str, like: torch.Tensor) -> torch.Tensor | None:
    """(rows, kv_heads, context_width, d): each row's context K (or V), padded; None without contexts."""
    if not lay.context_width:
        return None
    heads, d = like.shape[1], like.shape[2]
    padded = [F.pad(getattr(c.layers[index], which), (0, 0, 0, lay.context_width - c.length)) for c in packed.groups]
    return packed.per_row(padded, like.new_zeros(heads, lay.context_width, d))


def padded(q, k, v, packed, index: int, last_only: bool, states=None) -> torch.Tensor:
    lay = packed.cached("pad", lambda: PadLayout.of(packed))
    count = len(packed)
    keys, values = _to_grid(k, lay, count), _to_grid(v, lay, count)
    ctx_k, ctx_v = _context_grid(packed, index, lay, "k", k), _context_grid(packed, index, lay, "v", v)
    if ctx_k is not None:
        keys, values = torch.cat([ctx_k, keys], dim=2), torch.cat([ctx_v, values], dim=2)
    mask = lay.mask(last_only)
    query = q[:, :, None] if last_only else _to_grid(q, lay, count)  # (rows, heads, n, d)
    if query.device.type == "cuda":  # the memory-efficient kernel takes a mask but not grouped heads
        group = query.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=keys.shape[1] != query.shape[1])
    if last_only:
        return out[:, :, 0]
    return out.transpose(1, 2).reshape(count * lay.width, *q.shape[1:])[lay.flat]


PREFILL = {"sdpa": rows, "padded": padded}
