"""Qwen3.5 (the Prism 0.8B, 2B, 4B and 9B rerankers): a hybrid of Gated DeltaNet and gated full attention.

The family's facts: `layer_types` says which layers are linear attention (Gated DeltaNet) and which full
attention; norms are zero-centred (scale 1 + w); rope turns only `partial_rotary_factor` of each head (the
multimodal rope sections all see the same text position, so they reduce to ordinary rope); full attention
gates its output with a sigmoid of a second half of q_proj. Linear attention scans in 64-token chunks from a
sequence's start, so a cached state that later tokens continue from ends at a multiple of 64
(`chunk_align`): then the continuation chunks exactly as one full pass does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prism_ray.engine import delta_rule
from prism_ray.engine.models.base import Attention, Family, Linear, LinearState, Rows, SlotSelection


def zero_centred_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).type_as(x)


def family(config) -> Family:
    rope = config.rope_parameters
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} is not supported (only 'default')")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Family("qwen3_5", zero_centred_rms_norm, int(head_dim * rope.get("partial_rotary_factor", 1.0)),
                  float(rope["rope_theta"]), gated_attention=True, chunk_align=delta_rule.CHUNK, eps=config.rms_norm_eps)


class GatedDeltaNet:
    """Projections, the short causal convolution (with its carried-over inputs), gating, the gated delta rule
    (`delta_rule`) and the gated RMS norm of the output."""

    def __init__(self, w: dict[str, torch.Tensor], config, linear: Linear):
        p = "linear_attn."
        self.qkv, self.z, self.b, self.a, self.out = (w[f"{p}{n}.weight"] for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"))
        conv = w[f"{p}conv1d.weight"]  # (channels, 1, kernel)
        self.conv_weight = conv[:, 0].t().contiguous()  # (kernel, channels), for the decode step
        self.conv_filter = conv
        self.conv_bias = w.get(f"{p}conv1d.bias")
        self.kernel = conv.shape[-1]
        self.A_log, self.dt_bias, self.norm_weight = w[f"{p}A_log"], w[f"{p}dt_bias"], w[f"{p}norm.weight"]
        self.k_heads, self.v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.k_dim, self.v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.eps, self.linear = config.rms_norm_eps, linear

    def _project(self, x: torch.Tensor):
        lin = self.linear
        return lin(x, self.qkv, None), lin(x, self.z, None), lin(x, self.b, None), lin(x, self.a, None)

    def _split(self, mixed: torch.Tensor):
        n, kd = len(mixed), self.k_heads * self.k_dim
        q, k, v = mixed.split([kd, kd, self.v_heads * self.v_dim], dim=-1)
        return q.reshape(n, self.k_heads, self.k_dim), k.reshape(n, self.k_heads, self.k_dim), v.reshape(n, self.v_heads, self.v_dim)

    def _gates(self, b: torch.Tensor, a: torch.Tensor):
        return b.sigmoid(), -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)

    def _output(self, core: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The gated RMS norm (norm, then weight in the input dtype, then silu(z)), and out_proj."""
        n, dtype = len(core), core.dtype
        y = core.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.norm_weight * y.to(dtype)
        y = (y * F.silu(z.view(n, self.v_heads, self.v_dim).float())).to(dtype)
        return self.linear(y.reshape(n, -1), self.out, None)

    def _conv_rows(self, mixed: torch.Tensor, rows: Rows, index: int):
        """The causal depthwise convolution of every row, each continuing from its context's last inputs:
        the rows' inputs, each behind its carried-over (or zero) `kernel - 1` inputs, run as one stream, and
        the outputs at the rows' own tokens kept. Returns (activated output (T, C), the stream, row offsets)."""
        keep = self.kernel - 1
        parts = []
        for i, ctx in enumerate(rows.contexts):
            carried = ctx.layers[index].conv if ctx is not None else mixed.new_zeros(keep, mixed.shape[1])
            parts.extend((carried, mixed[rows.cu[i]:rows.cu[i + 1]]))
        stream = torch.cat(parts)  # (T + rows * keep, C)

        def gather_index():
            starts = [rows.cu[i] + i * keep for i in range(len(rows))]
            return torch.cat([torch.arange(s, s + n) for s, n in zip(starts, rows.lengths)]).to(mixed.device), starts

        take, starts = rows.cached(("conv_take", keep), gather_index)
        out = F.conv1d(stream.t()[None].to(self.conv_filter.dtype), self.conv_filter, self.conv_bias, groups=stream.shape[1])[0]
        return F.silu(out.t()[take]).to(mixed.dtype), stream, starts

    def prefill(self, x: torch.Tensor, rows: Rows, index: int, rope, keep_states: bool, last_only: bool = False):
        mixed, z, b, a = self._project(x)
        conv_out, stream, starts = self._conv_rows(mixed, rows, index)
        q, k, v = self._split(conv_out)
        beta, g = self._gates(b, a)
        initial = [c.layers[index].recurrent if c is not None else None for c in rows.contexts]
        core, final = delta_rule.chunk_rows(q, k, v, g, beta, rows.lengths, initial, output_final_state=keep_states)
        states = None
        if keep_states:
            keep = self.kernel - 1
            states = [LinearState(stream[s + n: s + n + keep].clone(), final[i]) for i, (s, n) in enumerate(zip(starts, rows.lengths))]
        return self._output(core, z), states

    def decode(self, x: torch.Tensor, positions: torch.Tensor, sel: SlotSelection, pool, rope, width: int) -> torch.Tensor:
        mixed, z, b, a = self._project(x)
        conv = sel.read(pool.conv)  # (A, kernel - 1, C)
        window = torch.cat([conv, mixed[:, None]], dim=1)
        sel.write(pool.conv, window[:, 1:])
        out = (window.to(self.conv_weight.dtype) * self.conv_weight).sum(1)
        if self.conv_bias is not None:
            out = out + self.conv_bias
        q, k, v = self._split(F.silu(out).to(mixed.dtype))
        beta, g = self._gates(b, a)
        state = sel.read(pool.recurrent)
        core = delta_rule.recurrent_step(q, k, v, g, beta, state)
        sel.write_back(pool.recurrent, state)
        return self._output(core, z)

    def empty_pool(self, slots: int, max_len: int):
        return LinearPool(slots, self.kernel - 1, self.qkv.shape[0], self.v_heads, self.k_dim, self.v_dim, self.qkv.dtype, self.qkv.device)


class LinearPool:
    def __init__(self, slots, keep, channels, v_heads, k_dim, v_dim, dtype, device):
        self.conv = torch.zeros(slots, keep, channels, dtype=dtype, device=device)
        self.recurrent = torch.zeros(slots, v_heads, k_dim, v_dim, dtype=torch.float32, device=device)

    def grow(self, max_len: int) -> None:
        """A linear-attention state does not grow with the sequence."""

    def store(self, slot: int, state: LinearState) -> None:
        self.conv[slot] = state.conv
        self.recurrent[slot] = state.recurrent


def mixers(config, layer_weights: list[dict[str, torch.Tensor]], fam: Family, linear: Linear) -> list:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    out = []
    for kind, w in zip(config.layer_types, layer_weights):
        if kind == "linear_attention":
            out.append(GatedDeltaNet(w, config, linear))
        elif kind == "full_attention":
            out.append(Attention(w, fam, linear, heads, kv_heads, head_dim))
        else:
            raise ValueError(f"layer type {kind!r} is not supported")
    return out
