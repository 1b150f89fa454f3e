"""Every touch of transformers' cache internals, in one place: copying a prefix state per row,
splitting a batched state into rows, and merging the states of several queries (or pairs) into one
batch.

A `DynamicCache` holds per layer either attention K/V (`keys`, `values`: batch, heads, length, dim)
or Gated DeltaNet states (`conv_states`, `recurrent_states`: dicts of batch-first tensors with no
length axis). Rows of different cached lengths share a batch by left-padding K/V (the pads are
masked) and stacking the fixed-size linear-attention states. A transformers upgrade that changes
this layout is a change to this module only.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from prism_ray.engine.transfer import to_device

_STATE_DICTS = ("conv_states", "recurrent_states")
_FLAG_DICTS = ("is_conv_states_initialized", "is_recurrent_states_initialized", "has_previous_state")


def _has_kv(layer) -> bool:
    return isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.numel() > 0


def cache_device(cache) -> torch.device:
    for layer in cache.layers:
        if _has_kv(layer):
            return layer.keys.device
        for name in _STATE_DICTS:
            for t in (getattr(layer, name, None) or {}).values():
                if isinstance(t, torch.Tensor):
                    return t.device
    return torch.device("cpu")


def _rebuild(caches: list, kv: Callable[[list[torch.Tensor]], torch.Tensor],
             state: Callable[[list[torch.Tensor]], torch.Tensor]):
    """A new cache shaped like `caches[0]` whose K/V are `kv([that layer's K (or V) of each cache])` and
    whose linear-attention states are `state([...])`. The inputs are not changed."""
    out_cache = copy.copy(caches[0])
    out_cache.layers = []
    for idx, layer in enumerate(caches[0].layers):
        parts = [c.layers[idx] for c in caches]
        out = copy.copy(layer)
        if _has_kv(layer):
            out.keys = kv([p.keys for p in parts])
            out.values = kv([p.values for p in parts])
        for name in _STATE_DICTS:
            states = getattr(layer, name, None)
            if isinstance(states, dict):
                setattr(out, name, {k: state([getattr(p, name)[k] for p in parts]) if isinstance(v, torch.Tensor)
                                    else v for k, v in states.items()})
        for name in _FLAG_DICTS:
            if isinstance(getattr(layer, name, None), dict):
                setattr(out, name, dict(getattr(layer, name)))
        out_cache.layers.append(out)
    return out_cache


def _repeat(t: torch.Tensor, batch_size: int) -> torch.Tensor:
    # Always a new tensor, even for batch_size 1: linear-attention layers update their states in place.
    return t.repeat(batch_size, *([1] * (t.ndim - 1)))


def repeat_rows(cache, batch_size: int):
    """A copy of a batch-1 cache repeated `batch_size` times along the batch axis (the original is kept:
    a prefix state is reused by every batch of its query)."""
    return _rebuild([cache], kv=lambda ts: _repeat(ts[0], batch_size), state=lambda ts: _repeat(ts[0], batch_size))


def split_rows(cache, batch_size: int) -> list:
    """Batch-1 caches, one per row of a batched cache of equal-length rows."""
    return [_rebuild([cache], kv=lambda ts, i=i: ts[0][i:i + 1].clone(), state=lambda ts, i=i: ts[0][i:i + 1].clone())
            for i in range(batch_size)]


def left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad the length axis (-2) of K or V to `length`."""
    return F.pad(t, (0, 0, length - t.shape[-2], 0))


def concat(caches: list, masks: list[torch.Tensor]):
    """One batched cache from batched caches whose K/V have different lengths, and its mask.

    `masks[i]` (rows of cache i, its K/V length; 1 = real slot) may have holes (the right pads of a
    batched prefill). K/V are left-padded to the longest and the masks with them; linear-attention states
    are stacked. The inputs are not changed.
    """
    longest = max(m.shape[1] for m in masks)
    merged = _rebuild(caches, kv=lambda ts: torch.cat([left_pad(t, longest) for t in ts]), state=torch.cat)
    return merged, torch.cat([F.pad(m, (longest - m.shape[1], 0)) for m in masks])


def select_rows(cache, index: torch.Tensor):
    """A new cache of the given rows (repeats allowed) of a batched cache."""
    return _rebuild([cache], kv=lambda ts: ts[0].index_select(0, index), state=lambda ts: ts[0].index_select(0, index))


def merge(caches: list, lengths: list[int], rows: list[int] | None = None):
    """One batched cache from batch-1 caches of different cached lengths, and the (batch, longest) mask
    of its real slots (1) and left pads (0).

    `rows[b]` is the cache batch row b continues from (default: one row per cache, in order), so several
    rows can continue from one query's state. The inputs are not changed.
    """
    merged, mask = concat(caches, [torch.ones(1, n, dtype=torch.long) for n in lengths])
    if rows is None or rows == list(range(len(caches))):
        return merged, mask
    index = torch.tensor(rows, dtype=torch.long)
    return select_rows(merged, to_device(index, cache_device(merged))), mask[index]


@contextlib.contextmanager
def conv_states_end_at(cache, ends: torch.Tensor):
    """Within the block, a prefill of right-padded rows into `cache` leaves each row's Gated DeltaNet conv
    state holding the inputs of its own last real tokens (`ends[b]` real tokens in row b's new input),
    where transformers keeps the last columns of the whole padded input."""
    patched = []
    for layer in cache.layers:
        if isinstance(getattr(layer, "conv_states", None), dict) and not getattr(layer, "record_past", False):
            layer.update_conv_state = _conv_update_ending_at(layer, layer.update_conv_state, ends)
            patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.update_conv_state  # back to the class's method


def _conv_update_ending_at(layer, update: Callable, ends: torch.Tensor) -> Callable:
    def ending_at(conv_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        full = update(conv_states, state_idx, **kwargs)  # earlier columns (state or zeros), then the new input
        state = layer.conv_states[state_idx]
        batch, channels, width = state.shape
        before = full.shape[-1] - conv_states.shape[-1]
        padded = F.pad(full, (width, 0))  # so a row shorter than the kernel reads zeros, as a fresh one would
        start = ends.to(full.device) + before  # (B,): in padded columns, end - width
        index = start[:, None] + torch.arange(width, device=full.device)[None]
        state.copy_(padded.gather(2, index[:, None, :].expand(batch, channels, width)))
        return full

    return ending_at
