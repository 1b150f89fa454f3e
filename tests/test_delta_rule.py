"""The engines' gated delta rule (packed chunked prefill, recurrent decode step) against transformers' PyTorch
reference, which path A runs on CPU, one row at a time."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule as reference
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule as reference_step

from prism_ray.engine.delta_rule import ChunkLayout, chunk_rows, recurrent_step


def _inputs(tokens, k_heads, v_heads, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    return dict(q=rand(tokens, k_heads, dim).to(dtype), k=rand(tokens, k_heads, dim).to(dtype), v=rand(tokens, v_heads, dim).to(dtype),
                g=-torch.rand(tokens, v_heads, generator=gen) * 2,  # log decay, <= 0
                beta=torch.rand(tokens, v_heads, generator=gen).to(dtype))


@pytest.mark.parametrize("lengths,k_heads,v_heads,with_state", [
    ([136, 7, 64, 1, 200], 4, 4, True),  # past one chunk, shorter than one, exactly one, one token
    ([64], 4, 4, False),  # one chunk, no state (a prefix)
    ([7, 130], 2, 4, True),  # grouped value heads
    ([200, 3, 65], 2, 2, False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_equal_the_reference_row_by_row(lengths, k_heads, v_heads, with_state, dtype):
    x = _inputs(sum(lengths), k_heads, v_heads, 32, dtype)
    init = torch.randn(len(lengths), v_heads, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.1 if with_state else None
    out, final = chunk_rows(**x, lengths=lengths, initial_state=init, output_final_state=True)
    assert out.dtype == dtype and final.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    start = 0
    for i, n in enumerate(lengths):
        row = {k: t[start:start + n][None] for k, t in x.items()}
        ref_out, ref_state = reference(row["q"], row["k"], row["v"], row["g"], row["beta"],
                                       initial_state=None if init is None else init[i:i + 1],
                                       output_final_state=True, use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(out[start:start + n].float(), ref_out[0].float(), atol=tol, rtol=tol)
        torch.testing.assert_close(final[i], ref_state[0].float(), atol=tol, rtol=tol)
        start += n


def test_no_final_state_unless_asked():
    x = _inputs(70, 2, 2, 16, torch.float32)
    out, final = chunk_rows(**x, lengths=[50, 20])
    assert final is None and out.shape == (70, 2, 16)


def test_chunk_layout_ranks_rows_by_chunks_and_packs_each_step():
    layout = ChunkLayout.of([65, 200, 1], torch.device("cpu"))
    assert layout.rank.tolist() == [1, 0, 2]  # 2, 4 and 1 chunks
    assert layout.active == [3, 2, 1, 1] and layout.offsets == [0, 3, 5, 6] and layout.chunks == 7
    assert layout.slots[:2].tolist() == [64, 65]  # row 0 (rank 1) fills buffer chunk 1 first
    assert layout.slots[65].tolist() == 0  # row 1's first token: buffer chunk 0
    assert len(set(layout.slots.tolist())) == 266  # no two tokens share a place


def test_recurrent_step_equals_the_reference_and_updates_the_state_in_place():
    x = _inputs(3, 2, 4, 16, torch.float32, seed=2)
    state = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ref_out, ref_state = reference_step(*(x[k][:, None] for k in ("q", "k", "v", "g", "beta")), initial_state=state.clone(),
                                        output_final_state=True, use_qk_l2norm_in_kernel=True)
    ours = state.clone()
    out = recurrent_step(x["q"], x["k"], x["v"], x["g"], x["beta"], ours)
    torch.testing.assert_close(out, ref_out[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, ref_state, atol=1e-5, rtol=1e-5)
