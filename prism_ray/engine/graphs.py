"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, over one slot pool.

An eager decode step of a 24-layer model is about a thousand small kernel launches, each costing the host
more than the GPU spends on it at decode batch sizes, so the GPU waits on Python. A CUDA graph records one
step's launches once and replays them with a single call. A graph replays fixed shapes and addresses, so:

- the graph of bucket b (`BUCKETS`) decodes the pool's first b slots, read and written in place as views
  (no gather of K/V or recurrent states, no scatter back): the step's slots must lie below b, and every other
  slot below b must be free (the pool hands out its lowest free slot, so active slots stay a compact range).
  A free slot in the range decodes a dummy token at position 0 into its own state, which nothing reads: a
  sequence stored there later overwrites it;
- tokens and positions live in static device buffers, written (by slot) before each replay;
- attention reads every position of the pool (`pool.max_len`), masked by each row's own position, instead of
  up to the longest active sequence;
- when the pool grows (its buffers move), the graphs are captured again.

`GraphedDecode(capture=False)` runs the same fixed-shape step eagerly: how the CPU tests check it against
`Model.decode_step`. The device check compares graph replay with eager decoding on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_ray.engine.models.base import Model, SlotPool, SlotSelection
from prism_ray.engine.transfer import to_device

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


def bucket(n: int, most: int | None = None) -> int:
    """The graph batch size that holds `n` rows: the smallest bucket, or the next multiple of 64 past them;
    at most `most` (a pool's slot count)."""
    b = next((b for b in BUCKETS if b >= n), -(-n // 64) * 64)
    return b if most is None else min(b, most)


@dataclass
class _Entry:
    tokens: torch.Tensor  # (b,) static input: slot i's token
    positions: torch.Tensor  # (b,) static input: slot i's position
    selection: SlotSelection  # slots 0..b-1
    graph: torch.cuda.CUDAGraph | None
    logits: torch.Tensor | None  # the graph's static output, row i for slot i


class GraphedDecode:
    """`Model.decode_step` for the slots of `pool`, one captured graph per bucket, replayed."""

    def __init__(self, net: Model, pool: SlotPool, capture: bool | None = None):
        self.net, self.pool = net, pool
        self.capture = pool.device.type == "cuda" if capture is None else capture
        self._entries: dict[int, _Entry] = {}
        self._buffers = self._pool_buffers()
        self._mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self.captures = 0  # graphs captured so far (each pool growth recaptures)

    def _pool_buffers(self) -> list[int]:
        return [t.data_ptr() for layer in self.pool.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]

    def step(self, tokens: torch.Tensor, positions: list[int], slots: list[int]) -> torch.Tensor:
        """Logits (len(slots), vocab) after feeding `tokens[k]` (on the device) at `positions[k]` to slot
        `slots[k]`. With slots 0..n-1 in order the result is a view of the graph's output buffer: read it
        before the next step."""
        if max(positions) >= self.pool.max_len:
            raise ValueError(f"position {max(positions)} is past the slot pool's {self.pool.max_len} tokens")
        if self._pool_buffers() != self._buffers:  # the pool grew: the graphs point at its old buffers
            self._entries.clear()
            self._buffers = self._pool_buffers()
        n, b = len(slots), bucket(max(slots) + 1, self.pool.slots)
        held = set(range(b)) - set(slots) - set(self.pool.free_slots)
        if held:
            raise ValueError(f"slots {sorted(held)} hold sequences but are not in this step: a graph decodes every slot below {b}")
        entry = self._entries.get(b) or self._build(b)
        positions_by_slot = [0] * b
        for slot, p in zip(slots, positions):
            positions_by_slot[slot] = p
        in_order = slots == list(range(n))
        meta = to_device(torch.tensor([positions_by_slot, list(slots) + [0] * (b - n)]), self.pool.device)
        entry.positions.copy_(meta[0])
        index = None if in_order else meta[1, :n]
        if in_order:
            entry.tokens[:n].copy_(tokens)
        else:
            entry.tokens.index_copy_(0, index, tokens)
        logits = self._run(entry) if entry.graph is None else (entry.graph.replay() or entry.logits)
        return logits[:n] if in_order else logits.index_select(0, index)

    def _run(self, entry: _Entry) -> torch.Tensor:
        return self.net.decode_tensors(entry.tokens, entry.positions, self.pool, entry.selection, self.pool.max_len)

    def _build(self, b: int) -> _Entry:
        device = self.pool.device
        zeros = torch.zeros(b, dtype=torch.long, device=device)
        entry = _Entry(zeros, zeros.clone(), SlotSelection.leading(torch.arange(b, device=device)), None, None)
        if self.capture:
            # Two eager runs first: lazy initialisation (cuBLAS handles, workspaces, compiles) outside the
            # capture. They write slots below b, some of which hold sequences: what they write is put back.
            written = [(view, view.clone()) for layer in self.pool.layers for view in layer.step_writes(b)]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run(entry)
                for view, before in written:
                    view.copy_(before)
            torch.cuda.current_stream().wait_stream(side)
            entry.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(entry.graph, pool=self._mempool):
                entry.logits = self._run(entry)
            self.captures += 1
        self._entries[b] = entry
        return entry
