"""flash-linear-attention's variable-length kernels for Qwen3.5's linear-attention layers (`kernels.py` choices).

On CUDA with `prism-ray[gpu]` installed, the packed rows go to fla's Triton kernels as one sequence batch with
`cu_seqlens`, each row starting from its context's state. The row offsets are handed over on the host too, so
the kernels' chunk index is built without waiting for the device.

- `delta_rule`: the chunked gated delta rule (each row chunked from its own first token, as
  `delta_rule.chunk_rows` does); q and k are l2-normalised inside the kernel, with the reference's eps (1e-6).
- `conv`: the short causal convolution and its silu in one kernel, each row after its context's last inputs.
"""

from __future__ import annotations

import torch


def available() -> bool:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure (no package, no triton, no GPU driver) means "not here"
        return False
    return True


def delta_rule(q, k, v, g, beta, rows, initial: torch.Tensor | None, output_final_state: bool):
    """q/k (T, Hk, Dk), v (T, Hv, Dv), g/beta (T, Hv) of packed `rows`; `initial` (rows, Hv, Dk, Dv) float32 or
    None. Returns (output (T, Hv, Dv), final states (rows, Hv, Dk, Dv) float32 or None)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    cu, cu_host = rows.cu_seqlens()
    if initial is not None:
        initial = initial.to(torch.float32).contiguous()
    out, final = chunk_gated_delta_rule(q[None], k[None], v.to(q.dtype)[None], g[None], beta.to(q.dtype)[None],
                                        scale=k.shape[-1] ** -0.5, initial_state=initial,
                                        output_final_state=output_final_state, use_qk_l2norm_in_kernel=True,
                                        cu_seqlens=cu, cu_seqlens_cpu=cu_host)
    return out[0], final


def conv(mixed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows, carried: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv) of packed `rows`: `mixed` (T, C), `weight` (C, kernel), `carried` (rows,
    kernel - 1, C) each row's preceding inputs or None (zeros). Returns (T, C) in `mixed`'s dtype."""
    from fla.modules.causal_conv1d import causal_conv1d

    cu, cu_host = rows.cu_seqlens()
    initial = None
    if carried is not None:  # fla's state holds `kernel` inputs, the oldest first; the first is never read
        initial = torch.cat([carried.new_zeros(len(carried), 1, carried.shape[2]), carried], dim=1).transpose(1, 2).contiguous()
    out, _ = causal_conv1d(mixed[None], weight, bias, initial_state=initial, activation="silu",
                           cu_seqlens=cu, cu_seqlens_cpu=cu_host)
    return out[0]
