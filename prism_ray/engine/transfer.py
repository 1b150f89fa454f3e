"""Host-to-device copies that do not stall the host, and the host-side index building that feeds them.

A plain `.to("cuda")` of a tensor in pageable host memory synchronizes the stream: the host stops until
every kernel already queued has run, so it cannot build (tokenize, pad, merge) the next batch while the GPU
computes this one. From pinned memory the copy is queued like a kernel instead.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t`, built on the host, on `device`. On CUDA through pinned memory (torch's pinned-memory cache keeps
    the staging buffer alive until the queued copy has run); elsewhere a plain `.to`."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def ragged_arange(starts: list[int], lengths: list[int]) -> torch.Tensor:
    """`cat(arange(s, s + n) for s, n in zip(starts, lengths))` on the host, without a tensor per row: the
    index tensors of a call with hundreds of rows are built in a few operations."""
    n = torch.tensor(lengths, dtype=torch.long)
    shift = torch.tensor(starts, dtype=torch.long) - (torch.cumsum(n, 0) - n)
    return torch.arange(int(n.sum())) + torch.repeat_interleave(shift, n)
