"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, over one slot pool.

An eager decode step of a 24-layer model is about a thousand small kernel launches, each costing the host
more than the GPU spends on it at decode batch sizes, so the GPU waits on Python. A CUDA graph records one
step's launches once and replays them with a single call. A graph replays fixed shapes and addresses, so:

- the batch is padded to a bucket size (`BUCKETS`); padding rows decode in the pool's scratch slot
  (`SlotPool(scratch=True)`), which no sequence owns;
- tokens, positions and slots live in static device buffers, written before each replay;
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


def bucket(n: int) -> int:
    """The graph batch size that holds `n` rows: the smallest bucket, or the next multiple of 64 past them."""
    return next((b for b in BUCKETS if b >= n), -(-n // 64) * 64)


@dataclass
class _Entry:
    tokens: torch.Tensor  # (b,) static input
    meta: torch.Tensor  # (2, b) static input: positions, slots
    graph: torch.cuda.CUDAGraph | None
    logits: torch.Tensor | None  # the graph's static output


class GraphedDecode:
    """`Model.decode_step` for the slots of `pool`, one captured graph per bucket, replayed."""

    def __init__(self, net: Model, pool: SlotPool, capture: bool | None = None):
        if pool.scratch is None:
            raise ValueError("GraphedDecode needs a SlotPool with a scratch slot (SlotPool(..., scratch=True))")
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
        `slots[k]`. The result is the graph's output buffer: read it before the next step."""
        if max(positions) >= self.pool.max_len:
            raise ValueError(f"position {max(positions)} is past the slot pool's {self.pool.max_len} tokens")
        if self._pool_buffers() != self._buffers:  # the pool grew: the graphs point at its old buffers
            self._entries.clear()
            self._buffers = self._pool_buffers()
        n, b = len(slots), bucket(len(slots))
        entry = self._entries.get(b) or self._build(b)
        pad = b - n
        meta = torch.tensor([list(positions) + [0] * pad, list(slots) + [self.pool.scratch] * pad])
        entry.meta.copy_(to_device(meta, self.pool.device), non_blocking=True)
        entry.tokens[:n].copy_(tokens)
        if entry.graph is None:
            return self._run(entry)[:n]
        entry.graph.replay()
        return entry.logits[:n]

    def _run(self, entry: _Entry) -> torch.Tensor:
        return self.net.decode_tensors(entry.tokens, entry.meta[0], self.pool, SlotSelection.indexed(entry.meta[1]),
                                       self.pool.max_len)

    def _build(self, b: int) -> _Entry:
        device = self.pool.device
        meta = torch.zeros(2, b, dtype=torch.long, device=device)
        meta[1] = self.pool.scratch  # warm-up and capture write only the scratch slot
        entry = _Entry(torch.zeros(b, dtype=torch.long, device=device), meta, None, None)
        if self.capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisation (cuBLAS handles, workspaces) outside the capture
                    self._run(entry)
            torch.cuda.current_stream().wait_stream(side)
            entry.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(entry.graph, pool=self._mempool):
                entry.logits = self._run(entry)
            self.captures += 1
        self._entries[b] = entry
        return entry
