"""The engines' own gated delta rule for the Gated DeltaNet layers wherever the Triton kernels do not run.

The Qwen3.5 linear-attention layers spend most of their non-projection time in transformers' PyTorch
reference code (`torch_chunk_gated_delta_rule` for prefill, `torch_recurrent_gated_delta_rule` for each
decode step) wherever the flash-linear-attention Triton kernels do not run (every CPU). This module
computes the same functions, in float32 as the reference does and equal to it up to float32 rounding
(the same arithmetic, reordered; `tests/test_gated_delta.py`), in fewer and larger tensor operations.
Prefill (`chunk_gated_delta_rule`):

- the (I + A)^-1 of each chunk's UT system is formed once (one triangular solve against the
  identity) and applied to the values and the decayed keys in one matmul, instead of two solves;
- each chunk's reads of the recurrent state (by the decayed keys and by the queries) are one matmul;
- the state update and output accumulate in place (`baddbmm`), with batch and heads flattened, on
  chunk-major copies made once, so each step of the scan reads contiguous memory.

Each row's chunk grid starts at the row's first token, as in the reference, so the padding is the same.
Decode (`recurrent_gated_delta_rule`) reads the state once per token instead of about ten times.

Inside `scope.engine_kernels()` the transformers modules' calls come here (outside it, a reference model
in the same process keeps the reference code). On CUDA with flash-linear-attention installed the Triton
kernels are kept.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib

import torch
import torch.nn.functional as F

from prism_ray.engine import scope

# Per-row real lengths of a right-padded prefill (see `rows_end_at`); None: every position is real.
_ROW_ENDS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("prism_row_ends", default=None)
# transformers modules whose Gated DeltaNet layers call a module-level `torch_chunk_gated_delta_rule`.
_MODULES = ("transformers.models.qwen3_5.modeling_qwen3_5", "transformers.models.qwen3_next.modeling_qwen3_next")


def _share_key_heads(query, key, v_heads: int):
    """Grouped value heads: each query/key head serves v_heads // k_heads consecutive value heads."""
    k_heads = key.shape[2]
    if k_heads == v_heads:
        return query, key
    return query.repeat_interleave(v_heads // k_heads, dim=2), key.repeat_interleave(v_heads // k_heads, dim=2)


def _normalize(q: torch.Tensor, k: torch.Tensor, l2norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries scaled by 1/sqrt(Dk); with `l2norm`, both first normalized as transformers' (and FLA's)
    l2norm does: x * rsqrt(sum(x^2) + 1e-6)."""
    scale = q.shape[-1] ** -0.5
    if not l2norm:
        return q * scale, k
    return tuple(x * (torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6) * c) for x, c in ((q, scale), (k, 1.0)))


def chunk_gated_delta_rule(query, key, value, g, beta, chunk_size: int = 64, initial_state=None,
                           output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False, **_):
    """Same arguments, shapes and result as transformers' `torch_chunk_gated_delta_rule`.

    query/key (B, T, Hk, Dk), value (B, T, Hv, Dv), g/beta (B, T, Hv), initial_state (B, Hv, Dk, Dv).
    Returns (output (B, T, Hv, Dv) in query's dtype, final state (B, Hv, Dk, Dv) in float32 or None).
    """
    out_dtype = query.dtype
    query, key = _share_key_heads(query, key, value.shape[-2])
    batch, length, v_heads, k_dim = key.shape
    v_dim = value.shape[-1]
    size = chunk_size
    pad = (size - length % size) % size
    chunks = (length + pad) // size
    rows = batch * v_heads

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        """(B, T, H[, D]) -> float32 (chunks, B * H, size[, D]), contiguous, padded: one copy. Each chunk's
        slice is contiguous for the sequential scan, and batch and heads are one axis for bmm."""
        if pad:
            x = F.pad(x, (0, 0) * (x.ndim - 2) + (0, pad))
        extra = x.shape[3:]
        x = x.reshape(batch, chunks, size, v_heads, *extra).permute(1, 0, 3, 2, *range(4, 4 + len(extra)))
        return x.to(torch.float32, memory_format=torch.contiguous_format).reshape(chunks, rows, size, *extra)

    q, k, v = (to_chunks(x) for x in (query, key, value))
    beta = to_chunks(beta)[..., None]
    cum = to_chunks(g).cumsum(-1)  # log decay from each chunk's start
    q, k = _normalize(q, k, use_qk_l2norm_in_kernel)

    upper = torch.ones(size, size, dtype=torch.bool, device=q.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill_(upper, float("-inf")).exp_()
    k_beta = k * beta
    k_t = k.transpose(-1, -2)
    system = (k_beta @ k_t).mul_(decay)  # its strict lower triangle is the UT system's A
    attn = (q @ k_t).mul_(decay)  # intra-chunk attention, causal (diagonal included)
    eye = torch.eye(size, dtype=system.dtype, device=system.device).expand_as(system)
    inverse = torch.linalg.solve_triangular(system, eye, upper=False, unitriangular=True)  # (I + A)^-1
    cum_exp = cum.exp()[..., None]
    # One matmul for the corrected values u = (I+A)^-1 (beta v) and the decayed keys w = (I+A)^-1 (beta k e^cum).
    rhs = torch.empty(chunks, rows, size, v_dim + k_dim, dtype=torch.float32, device=q.device)
    torch.mul(v, beta, out=rhs[..., :v_dim])
    torch.mul(k_beta, cum_exp, out=rhs[..., v_dim:])
    uw = inverse @ rhs
    u = uw[..., :v_dim]
    # Each chunk reads the state twice, by w (to correct u) and by the decayed queries: one matmul.
    readers = torch.empty(chunks, rows, 2 * size, k_dim, dtype=torch.float32, device=q.device)
    readers[:, :, :size] = uw[..., v_dim:]
    torch.mul(q, cum_exp, out=readers[:, :, size:])
    k_last = (k * (cum[..., -1:, None] - cum[..., None]).exp()).transpose(-1, -2).contiguous()
    chunk_decay = cum[..., -1].exp()[..., None, None]  # (chunks, rows, 1, 1)

    state = (torch.zeros(rows, k_dim, v_dim, dtype=torch.float32, device=q.device) if initial_state is None
             else initial_state.to(torch.float32).reshape(rows, k_dim, v_dim).clone())
    out = torch.empty(chunks, rows, size, v_dim, dtype=torch.float32, device=q.device)
    for i in range(chunks):
        read = torch.bmm(readers[i], state)
        v_new = torch.sub(u[i], read[:, :size])
        torch.baddbmm(read[:, size:], attn[i], v_new, out=out[i])
        state.mul_(chunk_decay[i]).baddbmm_(k_last[i], v_new)

    out = out.reshape(chunks, batch, v_heads, size, v_dim).permute(1, 0, 3, 2, 4)
    out = out.reshape(batch, chunks * size, v_heads, v_dim)
    out = out[:, :length].to(out_dtype, memory_format=torch.contiguous_format)
    final = state.reshape(batch, v_heads, k_dim, v_dim) if output_final_state else None
    return out, final


def recurrent_gated_delta_rule(query, key, value, g, beta, initial_state=None, output_final_state: bool = False,
                               use_qk_l2norm_in_kernel: bool = False, **_):
    """Same arguments, shapes and result as transformers' `torch_recurrent_gated_delta_rule` (the decode step),
    with `initial_state` updated in place when it is a float32 tensor (the engines' caches are their own
    copies, and transformers then copies the state onto itself, which torch skips).

    The reference makes about ten passes over the (B, H, Dk, Dv) float32 state per token, most of them
    new tensors; decoding a batch of 8 on the 0.8B model that is ~8 MB per layer and pass, and it dominates
    the step. Here a token costs one read (the state read by the key and the query in one bmm, the decay
    folded in afterwards: k.(d S) = d (k.S), q.(d S + k delta^T) = d (q.S) + (q.k) delta) and two in-place
    read-writes (decay, rank-1 update).
    """
    out_dtype = query.dtype
    query, key = _share_key_heads(query, key, value.shape[-2])
    batch, length, v_heads, k_dim = key.shape
    v_dim = value.shape[-1]
    rows = batch * v_heads

    def by_row(x: torch.Tensor) -> torch.Tensor:  # (B, T, H[, D]) -> float32 (B * H, T, D or 1)
        x = x.transpose(1, 2).to(torch.float32)
        return x.reshape(rows, length, -1)

    q, k, v, beta, decay = (by_row(x) for x in (query, key, value, beta, g))
    q, k = _normalize(q, k, use_qk_l2norm_in_kernel)
    decay = decay.exp()
    qk = (q * k).sum(-1, keepdim=True)
    readers = torch.stack([k, q], dim=2)  # (rows, T, 2, Dk)

    if initial_state is None:
        state = torch.zeros(batch, v_heads, k_dim, v_dim, dtype=torch.float32, device=q.device)
    elif initial_state.dtype == torch.float32 and initial_state.is_contiguous():
        state = initial_state
    else:
        state = initial_state.to(torch.float32, memory_format=torch.contiguous_format).clone()
    flat = state.view(rows, k_dim, v_dim)
    out = torch.empty(rows, length, v_dim, dtype=torch.float32, device=q.device)
    for t in range(length):
        read = torch.bmm(readers[:, t], flat)  # (rows, 2, Dv): k.S and q.S
        d = decay[:, t]
        delta = (v[:, t] - read[:, 0] * d) * beta[:, t]
        torch.addcmul(read[:, 1] * d, qk[:, t], delta, out=out[:, t])
        flat.mul_(d[:, :, None]).baddbmm_(k[:, t, :, None], delta[:, None, :])

    out = out.reshape(batch, v_heads, length, v_dim).transpose(1, 2).to(out_dtype, memory_format=torch.contiguous_format)
    return out, (state if output_final_state else None)


@functools.cache
def _triton_kernels(device_type: str) -> bool:
    from prism_ray.engine.kernels import linear_attention_kernels

    return linear_attention_kernels(torch.device(device_type))["gated_delta_rule"] == "fla"


_FAST = {"torch_chunk_gated_delta_rule": "chunk_gated_delta_rule",
         "torch_recurrent_gated_delta_rule": "recurrent_gated_delta_rule"}


@functools.cache
def install() -> None:
    """Wrap each transformers module's gated delta functions once: ours inside `scope.engine_kernels()` (and
    not on a device where flash-linear-attention's kernels run), the module's own otherwise; and, inside
    `rows_end_at`, the prefill's pads held out of the state whichever runs."""
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for reference, fast in _FAST.items():
            original = getattr(module, reference, None)
            if original is None or getattr(original, "_prism_dispatch", False):
                continue
            setattr(module, reference, _dispatcher(original, fast))


def _dispatcher(original, fast: str):
    def dispatch(*args, **kwargs):
        if fast == "chunk_gated_delta_rule" and _ROW_ENDS.get() is not None:
            args, kwargs = _hold_past_row_ends(args, kwargs, _ROW_ENDS.get())
        query = args[0] if args else kwargs["query"]
        if scope.active() and not _triton_kernels(query.device.type):
            return globals()[fast](*args, **kwargs)
        return original(*args, **kwargs)

    dispatch._prism_dispatch = True
    return dispatch


def _hold_past_row_ends(args, kwargs, ends: torch.Tensor):
    """beta = 0 and g = 0 (no write, no decay) at every position at or past its row's end, so the final
    recurrent state is the state after each row's last real token, whatever kernel runs the scan. g and
    beta are the 4th and 5th arguments, passed either way; the call keeps its form (kernels name their
    parameters differently)."""
    args = list(args)

    def masked(position: int, name: str) -> None:
        x = args[position] if len(args) > position else kwargs[name]
        real = torch.arange(x.shape[1], device=x.device)[None] < ends.to(x.device)[:, None]
        x = x * real[..., None].to(x.dtype)
        if len(args) > position:
            args[position] = x
        else:
            kwargs[name] = x

    masked(3, "g")
    masked(4, "beta")
    return tuple(args), kwargs


@contextlib.contextmanager
def rows_end_at(ends: torch.Tensor):
    """Within the block, a Gated DeltaNet prefill over right-padded rows leaves each row's recurrent state as
    it was after its own last real token (`ends[b]` real tokens in row b; see `_hold_past_row_ends`)."""
    install()
    token = _ROW_ENDS.set(ends)
    try:
        yield
    finally:
        _ROW_ENDS.reset(token)
