"""Qwen3.5 (the Prism 0.8B, 2B, 4B and 9B rerankers): a hybrid of Gated DeltaNet and gated full attention.

The family's facts: `layer_types` says which layers are linear attention (Gated DeltaNet) and which full
attention; norms are zero-centred (scale 1 + w); rope turns only `partial_rotary_factor` of each head (the
multimodal rope sections all see the same text position, so they reduce to ordinary rope); full attention
gates its output with a sigmoid of a second half of q_proj. Linear attention scans in 64-token chunks from a
sequence's start, so a cached state that later tokens continue from ends at a multiple of 64
(`chunk_align`): then the continuation chunks exactly as one full pass does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prism_ray.engine import delta_rule, pointwise
from prism_ray.engine.models.base import Attention, Family, Linear, LinearState, Rows, SlotSelection
from prism_ray.engine.transfer import ragged_arange, to_device

# (q, k, v, g, beta, rows, initial states (rows, Hv, Dk, Dv) or None, output_final_state) -> (out, final or None)
DeltaRule = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]


def zero_centred_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * (1 + w) in float32 (torch's fused rms_norm where the device has one);
    `scale` is 1 + w in float32 (`zero_centred_scale`)."""
    return F.rms_norm(x.float(), (x.shape[-1],), scale, eps).type_as(x)


def zero_centred_scale(weight: torch.Tensor) -> torch.Tensor:
    return 1.0 + weight.float()


def family(config) -> Family:
    rope = config.rope_parameters
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} is not supported (only 'default')")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Family("qwen3_5", zero_centred_rms_norm, zero_centred_scale, int(head_dim * rope.get("partial_rotary_factor", 1.0)),
                  float(rope["rope_theta"]), gated_attention=True, chunk_align=delta_rule.CHUNK, eps=config.rms_norm_eps)


class GatedDeltaNet:
    """Projections, the short causal convolution (with its carried-over inputs), gating, the gated delta rule
    (`delta_rule`) and the gated RMS norm of the output."""

    def __init__(self, w: dict[str, torch.Tensor], config, linear: Linear, delta_rule_kernel: DeltaRule, conv_kernel=None,
                 run=pointwise.eager):
        p = "linear_attn."
        self.delta_rule = delta_rule_kernel  # the chunked prefill kernel (`kernels.DELTA_RULE`)
        self.conv_kernel = conv_kernel  # a prefill convolution kernel (`kernels.CONV`), None: `_conv_rows`
        self.qkv, self.z, self.b, self.a, self.out = (w[f"{p}{n}.weight"] for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"))
        conv = w[f"{p}conv1d.weight"]  # (channels, 1, kernel)
        self.conv_weight = conv[:, 0].t().contiguous()  # (kernel, channels), for the decode step
        self.conv_filter = conv
        self.conv_bias = w.get(f"{p}conv1d.bias")
        self.kernel = conv.shape[-1]
        self.neg_A = -w[f"{p}A_log"].float().exp()  # the decay rate -exp(A_log), once rather than per forward
        self.dt_bias, self.norm_weight = w[f"{p}dt_bias"], w[f"{p}norm.weight"]
        self.k_heads, self.v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.k_dim, self.v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.eps, self.linear = config.rms_norm_eps, linear
        self._gates_of, self._gated_rms, self._conv_step = run(pointwise.delta_gates), run(pointwise.gated_rms), run(pointwise.conv_step)

    def _project(self, x: torch.Tensor):
        lin = self.linear
        return lin(x, self.qkv, None), lin(x, self.z, None), lin(x, self.b, None), lin(x, self.a, None)

    def _split(self, mixed: torch.Tensor):
        n, kd = len(mixed), self.k_heads * self.k_dim
        q, k, v = mixed.split([kd, kd, self.v_heads * self.v_dim], dim=-1)
        return q.reshape(n, self.k_heads, self.k_dim), k.reshape(n, self.k_heads, self.k_dim), v.reshape(n, self.v_heads, self.v_dim)

    def _gates(self, b: torch.Tensor, a: torch.Tensor):
        return self._gates_of(b, a, self.neg_A, self.dt_bias)

    def _output(self, core: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The gated RMS norm (norm, then weight in the input dtype, then silu(z)), and out_proj."""
        return self.linear(self._gated_rms(core, z, self.norm_weight, self.eps), self.out, None)

    def _conv_rows(self, mixed: torch.Tensor, rows: Rows, index: int):
        """The causal depthwise convolution of every row, each continuing from its context's last inputs:
        the rows' inputs, each behind its carried-over (or zero) `kernel - 1` inputs, run as one stream, and
        the outputs at the rows' own tokens kept. Returns (activated output (T, C), the stream, the layout)."""
        keep, channels = self.kernel - 1, mixed.shape[1]
        lay = rows.cached(("conv", keep), lambda: ConvLayout.of(rows, keep))
        stream = mixed.new_empty(len(mixed) + len(rows) * keep, channels)
        stream.index_copy_(0, lay.own, mixed)
        carried = self._carried(mixed, rows, index)
        if carried is not None:
            stream.index_copy_(0, lay.carried, carried.reshape(-1, channels))
        else:
            stream.index_fill_(0, lay.carried, 0)
        out = F.conv1d(stream.t()[None].to(self.conv_filter.dtype), self.conv_filter, self.conv_bias, groups=channels)[0]
        return F.silu(out.t().index_select(0, lay.take)).to(mixed.dtype), stream, lay

    def _carried(self, mixed: torch.Tensor, rows: Rows, index: int) -> torch.Tensor | None:
        """(rows, kernel - 1, C): each row's context's last conv inputs (zeros without a context); None when no
        row has a context."""
        if not rows.groups:
            return None
        return rows.per_row([c.layers[index].conv for c in rows.groups], mixed.new_zeros(self.kernel - 1, mixed.shape[1]))

    def prefill(self, x: torch.Tensor, rows: Rows, index: int, rope, keep_states: bool, last_only: bool = False):
        mixed, z, b, a = self._project(x)
        if self.conv_kernel is not None and not keep_states:
            conv_out = self.conv_kernel(mixed, self.conv_filter[:, 0], self.conv_bias, rows, self._carried(mixed, rows, index))
        else:
            conv_out, stream, lay = self._conv_rows(mixed, rows, index)
        q, k, v = self._split(conv_out)
        beta, g = self._gates(b, a)
        initial = None
        if rows.groups:
            initial = rows.per_row([c.layers[index].recurrent for c in rows.groups],
                                   rows.groups[0].layers[index].recurrent.new_zeros(self.v_heads, self.k_dim, self.v_dim))
        core, final = self.delta_rule(q, k, v, g, beta, rows, initial, keep_states)
        states = None
        if keep_states:
            keep = self.kernel - 1
            states = [LinearState(stream[s + n: s + n + keep].clone(), final[i]) for i, (s, n) in enumerate(zip(lay.starts, rows.lengths))]
        return self._output(core, z), states

    def decode(self, x: torch.Tensor, positions: torch.Tensor, sel: SlotSelection, pool, rope, width: int) -> torch.Tensor:
        mixed, z, b, a = self._project(x)
        conv = sel.read(pool.conv)  # (A, kernel - 1, C)
        window = torch.cat([conv, mixed[:, None]], dim=1)
        sel.write(pool.conv, window[:, 1:])
        q, k, v = self._split(self._conv_step(window, self.conv_weight, self.conv_bias, mixed.dtype))
        beta, g = self._gates(b, a)
        state = sel.read(pool.recurrent)
        core = delta_rule.recurrent_step(q, k, v, g, beta, state)
        sel.write_back(pool.recurrent, state)
        return self._output(core, z)

    def empty_pool(self, slots: int, max_len: int):
        return LinearPool(slots, self.kernel - 1, self.qkv.shape[0], self.v_heads, self.k_dim, self.v_dim, self.qkv.dtype, self.qkv.device)


@dataclass(frozen=True)
class ConvLayout:
    """Where packed rows lie in the convolution's stream: each row behind its `keep` carried-over inputs."""

    own: torch.Tensor  # (T,) token t's place in the stream
    carried: torch.Tensor  # (rows * keep,) the carried-over inputs' places, row by row
    take: torch.Tensor  # (T,) the convolution's output at token t (the window that ends at it)
    starts: list[int]  # row i's first place in the stream (its carried-over inputs, then its own)

    @staticmethod
    def of(rows: Rows, keep: int) -> ConvLayout:
        starts = [rows.cu[i] + i * keep for i in range(len(rows))]
        take = ragged_arange(starts, rows.lengths)
        carried = ragged_arange(starts, [keep] * len(starts))
        dev = rows.device
        return ConvLayout(to_device(take + keep, dev), to_device(carried, dev), to_device(take, dev), starts)


class LinearPool:
    def __init__(self, slots, keep, channels, v_heads, k_dim, v_dim, dtype, device):
        self.conv = torch.zeros(slots, keep, channels, dtype=dtype, device=device)
        self.recurrent = torch.zeros(slots, v_heads, k_dim, v_dim, dtype=torch.float32, device=device)

    def grow(self, max_len: int) -> None:
        """A linear-attention state does not grow with the sequence."""

    def store(self, slot: int, state: LinearState) -> None:
        self.conv[slot] = state.conv
        self.recurrent[slot] = state.recurrent

    def step_writes(self, b: int) -> list[torch.Tensor]:
        """What a decode step of slots 0..b-1 writes (views)."""
        return [self.conv[:b], self.recurrent[:b]]


def mixers(config, layer_weights: list[dict[str, torch.Tensor]], fam: Family, kernels) -> list:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    out = []
    for kind, w in zip(config.layer_types, layer_weights):
        if kind == "linear_attention":
            out.append(GatedDeltaNet(w, config, kernels.linear, kernels.delta_rule, kernels.conv, kernels.run))
        elif kind == "full_attention":
            out.append(Attention(w, fam, kernels.linear, heads, kv_heads, head_dim, kernels.attend, kernels.run))
        else:
            raise ValueError(f"layer type {kind!r} is not supported")
    return out
