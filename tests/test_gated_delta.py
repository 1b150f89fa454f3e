"""The engines' gated delta rules (chunked prefill, recurrent decode) against transformers' PyTorch reference, which path A runs."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers.models.qwen3_5 import modeling_qwen3_5
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule as reference
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule as reference_recurrent

from prism_ray.engine import gated_delta
from prism_ray.engine.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule
from prism_ray.engine.scope import engine_kernels


def _inputs(batch, length, k_heads, v_heads, dim, dtype, seed=0, with_state=True):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    return dict(
        query=rand(batch, length, k_heads, dim).to(dtype), key=rand(batch, length, k_heads, dim).to(dtype),
        value=rand(batch, length, v_heads, dim).to(dtype),
        g=-torch.rand(batch, length, v_heads, generator=gen) * 2,  # log decay, <= 0
        beta=torch.rand(batch, length, v_heads, generator=gen).to(dtype),
        initial_state=rand(batch, v_heads, dim, dim) * 0.1 if with_state else None,
    )


@pytest.mark.parametrize("batch,length,k_heads,v_heads,with_state", [
    (3, 136, 4, 4, True),  # lengths past one chunk, not a multiple of it
    (1, 64, 4, 4, False),  # exactly one chunk, no state (a prefix)
    (2, 7, 2, 4, True),  # shorter than a chunk; grouped value heads
    (1, 1, 4, 4, True),  # one token
    (2, 200, 2, 2, False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_reference(batch, length, k_heads, v_heads, with_state, dtype):
    args = _inputs(batch, length, k_heads, v_heads, 32, dtype, with_state=with_state)
    for l2norm in (True, False):
        ref_out, ref_state = reference(**args, output_final_state=True, use_qk_l2norm_in_kernel=l2norm)
        out, state = chunk_gated_delta_rule(**args, output_final_state=True, use_qk_l2norm_in_kernel=l2norm)
        assert out.dtype == ref_out.dtype == dtype and out.shape == ref_out.shape
        assert state.dtype == torch.float32 and state.shape == ref_state.shape
        # Both compute in float32; only the order of operations differs, so they agree to float32 rounding
        # relative to the values' size (without the l2 norm, random keys make the state grow large). A bf16
        # output differs by at most one rounding of that type.
        scale = max(1.0, ref_out.float().abs().max().item())
        out_tol = 1e-5 * scale if dtype == torch.float32 else 2 ** -7 * scale
        torch.testing.assert_close(out.float(), ref_out.float(), atol=out_tol, rtol=0)
        torch.testing.assert_close(state, ref_state, atol=1e-5 * max(1.0, ref_state.abs().max().item()), rtol=0)
    out, state = chunk_gated_delta_rule(**args, output_final_state=False, use_qk_l2norm_in_kernel=True)
    assert state is None


def test_inputs_are_left_unchanged():
    args = _inputs(2, 70, 2, 2, 16, torch.float32)
    before = {k: v.clone() for k, v in args.items()}
    chunk_gated_delta_rule(**args, output_final_state=True, use_qk_l2norm_in_kernel=True)
    for name, value in args.items():
        assert torch.equal(value, before[name]), name


def test_only_the_calling_context_runs_it(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return chunk_gated_delta_rule(*args, **kwargs)

    monkeypatch.setattr(gated_delta, "chunk_gated_delta_rule", counting)
    args = _inputs(1, 10, 2, 2, 16, torch.float32)
    with engine_kernels():
        inside, _ = modeling_qwen3_5.torch_chunk_gated_delta_rule(**args, use_qk_l2norm_in_kernel=True)
    assert len(calls) == 1
    outside, _ = modeling_qwen3_5.torch_chunk_gated_delta_rule(**args, use_qk_l2norm_in_kernel=True)
    assert len(calls) == 1  # outside the block the module's own function runs
    torch.testing.assert_close(inside, outside, atol=1e-6, rtol=0)


@pytest.mark.parametrize("length,k_heads,v_heads", [(1, 4, 4), (3, 2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recurrent_step_matches_the_reference(length, k_heads, v_heads, dtype):
    args = _inputs(3, length, k_heads, v_heads, 32, dtype)
    ref_out, ref_state = reference_recurrent(**{**args, "initial_state": args["initial_state"].clone()},
                                             output_final_state=True, use_qk_l2norm_in_kernel=True)
    state = args["initial_state"]
    out, new_state = recurrent_gated_delta_rule(**args, output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert new_state is state  # updated in place: the caller's cache tensor
    scale = max(1.0, ref_out.float().abs().max().item())
    tol = 1e-5 * scale if dtype == torch.float32 else 2 ** -7 * scale
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=0)
    torch.testing.assert_close(new_state, ref_state, atol=1e-5, rtol=1e-5)
    fresh, _ = recurrent_gated_delta_rule(**{**args, "initial_state": None}, use_qk_l2norm_in_kernel=True)
    ref_fresh, _ = reference_recurrent(**{**args, "initial_state": None}, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(fresh.float(), ref_fresh.float(), atol=tol, rtol=0)


@pytest.mark.parametrize("ours", [True, False])
def test_rows_end_at_holds_the_pads_out_of_the_final_state(ours):
    """Right-padded rows (lengths 70, 5, 64 in a batch of 100 positions) end in the state each row's own
    tokens leave, with this module's scan and with transformers' (which stands for any kernel: the pads
    are held out before the call)."""
    gated_delta.install()
    padded = _inputs(3, 100, 2, 4, 32, torch.float32, seed=3)
    ends = torch.tensor([70, 5, 64])
    with engine_kernels() if ours else contextlib.nullcontext(), gated_delta.rows_end_at(ends):
        out, state = modeling_qwen3_5.torch_chunk_gated_delta_rule(**padded, output_final_state=True,
                                                                   use_qk_l2norm_in_kernel=True)
    for row, end in enumerate(ends.tolist()):
        alone = {k: v[row:row + 1, :end] if k != "initial_state" else v[row:row + 1] for k, v in padded.items()}
        ref_out, ref_state = reference(**alone, output_final_state=True, use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(state[row:row + 1], ref_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[row:row + 1, :end], ref_out, atol=1e-5, rtol=1e-5)
    _, unheld = reference(**padded, output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert not torch.allclose(unheld[1], state[1], atol=1e-2)  # without the block, row 1's pads do write
