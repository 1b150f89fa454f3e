"""flash-linear-attention's variable-length chunked gated delta rule, as a prefill kernel of `kernels.DELTA_RULE`.

On CUDA with `prism-ray[gpu]` installed: the packed rows go to fla's Triton kernels as one sequence batch
with `cu_seqlens` (each row chunked from its own first token, as `delta_rule.chunk_rows` does), each row
starting from its context's recurrent state. The row offsets are handed over on the host too, so the kernels'
chunk index is built without waiting for the device. q and k are l2-normalised inside the kernel, with the
eps of the reference (1e-6).
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
