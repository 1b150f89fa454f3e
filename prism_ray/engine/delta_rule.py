"""The gated delta rule of the Gated DeltaNet layers, in PyTorch: a chunked scan over packed rows (prefill) and
the recurrent step (decode). Pure functions over tensors; the CPU kernels of `models/qwen3_5.py`.

The arithmetic is that of transformers' reference code (`torch_chunk_gated_delta_rule`,
`torch_recurrent_gated_delta_rule`, which path A runs on CPU), in float32, reordered into fewer and larger
tensor operations; results agree to float32 rounding (`tests/test_delta_rule.py`).

Prefill (`chunk_rows`) takes the rows of a call as one flat token stream with per-row lengths, no padding
between rows. Each row is cut into 64-token chunks from its own first token (the reference's grid: every
row starts at a multiple of 64 of its sequence, `models.base.Family.chunk_align`), and only a row's last
chunk is filled up, with tokens that neither write nor decay (beta = 0, g = 0), so a row's final state is
the state after its last real token. The scan is sequential in chunks and parallel over rows: step s runs
chunk s of every row that has one. Rows are ranked by chunk count, so at step s those rows are the first
m_s of the state and their chunks one contiguous block. Per chunk:

- the (I + A)^-1 of the UT system is formed once (one triangular solve against the identity) and applied to
  the values and the decayed keys in one matmul;
- the chunk's two reads of the recurrent state (by the decayed keys and by the queries) are one matmul;
- the state update and output accumulate in place (`baddbmm`).

Decode (`recurrent_step`) reads the state once per token and updates it in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_ray.engine.transfer import ragged_arange, to_device

CHUNK = 64


def _share_key_heads(q: torch.Tensor, k: torch.Tensor, v_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped value heads: each query/key head serves v_heads // k_heads consecutive value heads (head axis -2)."""
    k_heads = k.shape[-2]
    if k_heads == v_heads:
        return q, k
    return q.repeat_interleave(v_heads // k_heads, dim=-2), k.repeat_interleave(v_heads // k_heads, dim=-2)


def _normalize(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both l2-normalised as the reference's l2norm (x * rsqrt(sum(x^2) + 1e-6)), queries also scaled by 1/sqrt(Dk)."""
    scale = q.shape[-1] ** -0.5
    return tuple(x * (torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6) * c) for x, c in ((q, scale), (k, 1.0)))


@dataclass(frozen=True)
class ChunkLayout:
    """Where each token of packed rows lies in the chunk-major buffer of `chunk_rows`.

    Chunks are ordered by step, then by row rank: step s holds chunk s of the `active[s]` rows with the most
    chunks, at buffer chunks `offsets[s]:offsets[s] + active[s]`.
    """

    slots: torch.Tensor  # (T,) token t's position in the flat (chunks * CHUNK) buffer
    rank: torch.Tensor  # (rows,) row i's rank (rows ranked by chunk count, longest first)
    active: list[int]  # rows with a chunk at step s
    offsets: list[int]  # first buffer chunk of step s
    chunks: int

    @staticmethod
    def of(lengths: list[int], device: torch.device) -> ChunkLayout:
        counts = [-(-n // CHUNK) for n in lengths]
        order = sorted(range(len(lengths)), key=lambda i: -counts[i])
        rank = [0] * len(lengths)
        for r, i in enumerate(order):
            rank[i] = r
        steps = counts[order[0]] if lengths else 0
        active = [sum(1 for c in counts if c > s) for s in range(steps)]
        offsets = [0]
        for m in active[:-1]:
            offsets.append(offsets[-1] + m)
        offsets_t = torch.tensor(offsets + [0], dtype=torch.long)
        t = ragged_arange([0] * len(lengths), lengths)  # each token's place in its own row
        slots = (offsets_t[t // CHUNK] + torch.repeat_interleave(torch.tensor(rank, dtype=torch.long), torch.tensor(lengths))) * CHUNK + t % CHUNK
        return ChunkLayout(to_device(slots, device), to_device(torch.tensor(rank), device), active, offsets, sum(active))


def chunk_rows(q, k, v, g, beta, lengths: list[int], initial_state=None, output_final_state: bool = False,
               layout: ChunkLayout | None = None):
    """The gated delta rule over packed rows.

    q/k (T, Hk, Dk), v (T, Hv, Dv), g/beta (T, Hv): the rows' tokens one after another, row i holding
    `lengths[i]` of them. initial_state: (rows, Hv, Dk, Dv), or one (Hv, Dk, Dv) tensor or None (zeros) per
    row, or None; each is copied once, into the scan's own state, and never written. Returns (output
    (T, Hv, Dv) in q's dtype, final state (rows, Hv, Dk, Dv) in float32, or None).
    """
    out_dtype = q.dtype
    device = q.device
    q, k = _share_key_heads(q, k, v.shape[-2])
    heads, k_dim, v_dim = v.shape[1], k.shape[-1], v.shape[-1]
    rows = len(lengths)
    layout = layout or ChunkLayout.of(lengths, device)
    size, chunks = CHUNK, layout.chunks

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        """(T, H[, D]) -> float32 (chunks, H, size[, D]), the chunk-major buffer with zeros past each row's end."""
        flat = torch.zeros(chunks * size, *x.shape[1:], dtype=torch.float32, device=device)
        flat[layout.slots] = x.to(torch.float32)
        flat = flat.view(chunks, size, *x.shape[1:])
        return flat.transpose(1, 2).contiguous()

    q, k, v = (to_chunks(x) for x in (q, k, v))
    beta = to_chunks(beta)[..., None]
    cum = to_chunks(g).cumsum(-1)  # log decay from each chunk's start
    q, k = _normalize(q, k)

    upper = torch.ones(size, size, dtype=torch.bool, device=device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill_(upper, float("-inf")).exp_()
    k_beta = k * beta
    k_t = k.transpose(-1, -2)
    system = (k_beta @ k_t).mul_(decay)  # its strict lower triangle is the UT system's A
    attn = (q @ k_t).mul_(decay)  # intra-chunk attention, causal (diagonal included)
    eye = torch.eye(size, dtype=system.dtype, device=device).expand_as(system)
    inverse = torch.linalg.solve_triangular(system, eye, upper=False, unitriangular=True)  # (I + A)^-1
    cum_exp = cum.exp()[..., None]
    # One matmul for the corrected values u = (I+A)^-1 (beta v) and the decayed keys w = (I+A)^-1 (beta k e^cum).
    rhs = torch.empty(chunks, heads, size, v_dim + k_dim, dtype=torch.float32, device=device)
    torch.mul(v, beta, out=rhs[..., :v_dim])
    torch.mul(k_beta, cum_exp, out=rhs[..., v_dim:])
    uw = inverse @ rhs
    u = uw[..., :v_dim]
    # Each chunk reads the state twice, by w (to correct u) and by the decayed queries: one matmul.
    readers = torch.empty(chunks, heads, 2 * size, k_dim, dtype=torch.float32, device=device)
    readers[:, :, :size] = uw[..., v_dim:]
    torch.mul(q, cum_exp, out=readers[:, :, size:])
    k_last = (k * (cum[..., -1:, None] - cum[..., None]).exp()).transpose(-1, -2).contiguous()
    chunk_decay = cum[..., -1].exp()[..., None, None]  # (chunks, heads, 1, 1)

    by_rank = torch.zeros(rows, heads, k_dim, v_dim, dtype=torch.float32, device=device)
    if isinstance(initial_state, torch.Tensor):
        by_rank[layout.rank] = initial_state.to(torch.float32)
    elif initial_state is not None:
        for rank, start in zip(layout.rank.tolist(), initial_state):
            if start is not None:
                by_rank[rank] = start
    state = by_rank.view(rows * heads, k_dim, v_dim)
    out = torch.empty(chunks, heads, size, v_dim, dtype=torch.float32, device=device)
    for active, start in zip(layout.active, layout.offsets):
        block = slice(start, start + active)
        s = state[: active * heads]

        def flat(x: torch.Tensor, block=block, active=active) -> torch.Tensor:
            return x[block].reshape(active * heads, *x.shape[2:])

        read = torch.bmm(flat(readers), s)
        v_new = torch.sub(flat(u), read[:, :size])
        out[block] = torch.baddbmm(read[:, size:], flat(attn), v_new).view(active, heads, size, v_dim)
        s.mul_(flat(chunk_decay)).baddbmm_(flat(k_last), v_new)

    out = out.transpose(1, 2).reshape(chunks * size, heads, v_dim)[layout.slots].to(out_dtype)
    final = state.view(rows, heads, k_dim, v_dim)[layout.rank] if output_final_state else None
    return out, final


def recurrent_step(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """One decode token per row: q/k (A, Hk, Dk), v (A, Hv, Dv), g/beta (A, Hv); `state` (A, Hv, Dk, Dv) float32,
    contiguous, updated in place. Returns the output (A, Hv, Dv) in q's dtype.

    The reference makes about ten passes over the float32 state per token, most of them new tensors. Here a
    token costs one read (the state read by the key and the query in one bmm, the decay folded in afterwards:
    k.(d S) = d (k.S), q.(d S + k delta^T) = d (q.S) + (q.k) delta) and two in-place read-writes (decay,
    rank-1 update).
    """
    out_dtype = q.dtype
    q, k = _share_key_heads(q, k, v.shape[-2])
    rows, heads, k_dim = k.shape
    v_dim = v.shape[-1]
    q, k = _normalize(q.to(torch.float32), k.to(torch.float32))
    q, k, v = (x.reshape(rows * heads, -1) for x in (q, k, v.to(torch.float32)))
    decay = g.to(torch.float32).exp().reshape(rows * heads, 1)
    beta = beta.to(torch.float32).reshape(rows * heads, 1)
    flat = state.view(rows * heads, k_dim, v_dim)
    read = torch.bmm(torch.stack([k, q], dim=1), flat)  # (rows*heads, 2, Dv): k.S and q.S
    delta = (v - read[:, 0] * decay) * beta
    out = read[:, 1] * decay + (q * k).sum(-1, keepdim=True) * delta
    flat.mul_(decay[:, :, None]).baddbmm_(k[:, :, None], delta[:, None, :])
    return out.view(rows, heads, v_dim).to(out_dtype)
