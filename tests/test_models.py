"""The engines' own forward (prism_ray/engine/models/) against transformers' forward on the same weights, and
the slot pool and prefix states it decodes and continues from."""

from __future__ import annotations

import pytest
import torch

from prism_ray.engine import EvidenceEngine, load_model
from prism_ray.engine.graphs import GraphedDecode, bucket
from prism_ray.engine.loading import with_kernels
from prism_ray.engine.models import Rows, SlotPool

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaded_models(tiny_ckpt, qwen3_ckpt):
    return {str(p): load_model(p, dtype="float32") for p in (tiny_ckpt, qwen3_ckpt)}


def _ids(n, seed=0):
    return torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(seed))


def _hf_last_hidden(loaded, ids):
    with torch.inference_mode():
        return loaded.model.model(input_ids=ids[None]).last_hidden_state[0, -1]


def _hf_next_logits(loaded, ids):
    with torch.inference_mode():
        return loaded.model(input_ids=ids[None]).logits[0, -1]


@torch.inference_mode()
def test_packed_rows_from_a_context_equal_whole_sequences(loaded_models, any_ckpt):
    """A 128-token context, then three packed rows continuing from it (and one from nothing): each row's last
    hidden state equals transformers' forward over the whole sequence."""
    loaded = loaded_models[str(any_ckpt)]
    net, ids = loaded.net, _ids(330)
    _, (ctx,) = net.forward_rows(ids[:128], Rows([128], [None], CPU), keep_states=True)
    tails = [ids[128:330], ids[128:131], ids[128:129]]
    packed = torch.cat(tails + [ids[:77]])
    hidden, _ = net.forward_rows(packed, Rows([202, 3, 1, 77], [ctx, ctx, ctx, None], CPU))
    for row, end in zip(hidden, (330, 131, 129, 77)):
        torch.testing.assert_close(row, _hf_last_hidden(loaded, ids[:end]), atol=1e-4, rtol=1e-4)


@torch.inference_mode()
@pytest.mark.parametrize("attention", ["sdpa", "padded"])
def test_each_prefill_kernel_packs_rows_of_several_contexts_as_whole_sequences(loaded_models, any_ckpt, attention):
    """Rows of two contexts of different lengths and rows of none, interleaved in one forward (with and
    without the last-token-only final layer): every row's last hidden state equals transformers' forward over
    its whole sequence, whichever prefill attention kernel runs."""
    loaded = with_kernels(loaded_models[str(any_ckpt)], {"attention": attention})
    assert loaded.kernels["attention"] == attention
    net, ids = loaded.net, _ids(400, seed=3)
    _, (short, long) = net.forward_rows(torch.cat([ids[:64], ids[:192]]), Rows([64, 192], [None, None], CPU), keep_states=True)
    spans = [(192, 260, long), (64, 65, short), (0, 50, None), (192, 193, long), (64, 200, short), (0, 3, None)]
    packed = torch.cat([ids[lo:hi] for lo, hi, _ in spans])
    rows = Rows([hi - lo for lo, hi, _ in spans], [c for _, _, c in spans], CPU)
    for last_only in (True, False):
        hidden, _ = net.forward_rows(packed, rows, last_only=last_only)
        for row, (_, end, _) in zip(hidden, spans):
            torch.testing.assert_close(row, _hf_last_hidden(loaded, ids[:end]), atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_a_last_attention_layer_keeping_states_attends_from_each_rows_last_token_only(loaded_models, any_ckpt, monkeypatch):
    """With `keep_states` (a query's prefix, a long row's pieces) the last attention layer still computes
    every token's K/V, the state later rows read, but queries and attends from each row's last token only:
    the states are those of the whole last layer, bit for bit, and the hidden states agree with it."""
    net = loaded_models[str(any_ckpt)].net
    ids, rows = _ids(200, seed=5), Rows([120, 80], [None, None], CPU)
    whole_hidden, whole_states = net.forward_rows(ids, rows, keep_states=True, last_only=False)
    mixer, queries = net.layers[-1].mixer, []
    attend = mixer.attend

    def counting(q, *args):
        queries.append(len(q))
        return attend(q, *args)

    monkeypatch.setattr(mixer, "attend", counting)
    hidden, states = net.forward_rows(ids, rows, keep_states=True)
    assert queries == [2]
    torch.testing.assert_close(hidden, whole_hidden, atol=1e-5, rtol=1e-5)
    for got, want in zip(states, whole_states):
        assert got.length == want.length
        for layer_got, layer_want in zip(got.layers, want.layers):
            for name in vars(layer_want):
                assert torch.equal(getattr(layer_got, name), getattr(layer_want, name)), name


@torch.inference_mode()
def test_compiled_pointwise_chains_match_transformers_in_prefill_and_decode(loaded_models, tiny_ckpt):
    """The `pointwise: compiled` choice (each chain through torch.compile) on the hybrid backbone, every chain
    in play: packed rows from a context and from none, two shapes (compiled static, then dynamic), and decode
    steps from the pool, each against transformers' forward over the whole sequence, in float32."""
    loaded = with_kernels(loaded_models[str(tiny_ckpt)], {"pointwise": "compiled"})
    assert loaded.kernels["pointwise"] == "compiled"
    net, ids = loaded.net, _ids(300, seed=4)
    _, (ctx,) = net.forward_rows(ids[:128], Rows([128], [None], CPU), keep_states=True)
    for tails in ([(128, 300), (0, 40)], [(128, 131), (128, 200), (0, 9)]):
        packed = torch.cat([ids[lo:hi] for lo, hi in tails])
        hidden, states = net.forward_rows(packed, Rows([hi - lo for lo, hi in tails], [ctx if lo else None for lo, _ in tails], CPU),
                                          keep_states=True)
        for row, (_, end) in zip(hidden, tails):
            torch.testing.assert_close(row, _hf_last_hidden(loaded, ids[:end]), atol=1e-4, rtol=1e-4)
    pool = SlotPool(net, 4, 256)
    seqs = [ids[:end] for _, end in tails]
    for slot, state in enumerate(states):
        pool.store(slot, state)
    tokens = torch.tensor([5, 7, 11])
    for _ in range(2):
        logits = net.decode_step(tokens, [len(s) for s in seqs], pool, pool.select([0, 1, 2]))
        seqs = [torch.cat([s, t[None]]) for s, t in zip(seqs, tokens)]
        for got, seq in zip(logits, seqs):
            torch.testing.assert_close(got, _hf_next_logits(loaded, seq), atol=1e-4, rtol=1e-4)
        tokens = logits.argmax(-1)


def test_kernel_overrides_are_checked_by_name(loaded_models, tiny_ckpt):
    loaded = loaded_models[str(tiny_ckpt)]
    with pytest.raises(ValueError, match=r"kernels.attention must be one of \['sdpa', 'padded'\], not 'flash'"):
        with_kernels(loaded, {"attention": "flash"})
    with pytest.raises(ValueError, match="unknown op 'norm'"):
        with_kernels(loaded, {"norm": "fused"})
    for op in ("gated_delta_rule", "causal_conv1d"):
        with pytest.raises(ValueError, match=f"kernels.{op} = 'fla' needs a CUDA device"):
            with_kernels(loaded, {op: "fla"})


@torch.inference_mode()
@pytest.mark.parametrize("slots", [[0, 1], [2, 0]])  # consecutive slots (views) and not (an index)
def test_decode_steps_from_the_pool_equal_whole_sequences(loaded_models, any_ckpt, slots):
    loaded = loaded_models[str(any_ckpt)]
    net, ids = loaded.net, _ids(300, seed=1)
    _, states = net.forward_rows(torch.cat([ids[:300], ids[:150]]), Rows([300, 150], [None, None], CPU), keep_states=True)
    pool = SlotPool(net, 3, 320)
    for slot, state in zip(slots, states):
        pool.store(slot, state)
    seqs = [ids[:300], ids[:150]]
    tokens = torch.tensor([5, 7])
    for _ in range(3):
        logits = net.decode_step(tokens, [len(s) for s in seqs], pool, pool.select(slots))
        seqs = [torch.cat([s, t[None]]) for s, t in zip(seqs, tokens)]
        for got, seq in zip(logits, seqs):
            torch.testing.assert_close(got, _hf_next_logits(loaded, seq), atol=1e-4, rtol=1e-4)
        tokens = logits.argmax(-1)


@torch.inference_mode()
def test_fixed_shape_decode_of_the_cuda_graphs_equals_eager_decode_and_refuses_a_held_slot_outside_it(loaded_models, any_ckpt):
    """The step `GraphedDecode` captures (the pool's first bucket-many slots in place, keys read over the whole
    pool), run eagerly here: the same logits as `decode_step` for slots out of order and with a free slot in
    the range, and a step that would run over a slot holding a sequence outside it is refused."""
    loaded = loaded_models[str(any_ckpt)]
    net, ids = loaded.net, _ids(300, seed=2)
    lengths = [300, 150, 70, 20]
    _, states = net.forward_rows(torch.cat([ids[:n] for n in lengths]), Rows(lengths, [None] * 4, CPU), keep_states=True)
    pools = [SlotPool(net, 5, 320), SlotPool(net, 5, 320)]
    for pool in pools:
        held = [pool.allocate() for _ in range(4)]
        for slot, state in zip(held, states):
            pool.store(slot, state)
        pool.release(1)  # slot 1 free: inside the bucket of 4, it decodes a dummy token that nothing reads
    slots = [2, 0, 3]
    graphed = GraphedDecode(net, pools[0], capture=False)
    positions, tokens = [lengths[s] for s in slots], torch.tensor([5, 7, 11])
    for _ in range(3):
        got = graphed.step(tokens, positions, slots)
        want = net.decode_step(tokens, positions, pools[1], pools[1].select(slots))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # a batch of 4 rounds as GEMMs of 4 rows do
        tokens, positions = want.argmax(-1), [p + 1 for p in positions]
    in_order = graphed.step(tokens[[1, 0, 2]], [positions[1], positions[0], positions[2]], [0, 2, 3])
    torch.testing.assert_close(in_order, net.decode_step(tokens, positions, pools[1], pools[1].select(slots))[[1, 0, 2]],
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"slots \[3\] hold sequences"):
        graphed.step(tokens[:2], positions[:2], [2, 0])
    assert bucket(3) == 4 and bucket(64) == 64 and bucket(65) == 96 and bucket(300) == 320 and bucket(3, most=3) == 3


@torch.inference_mode()
def test_a_released_slot_is_reused_and_the_others_stay_in_place(loaded_models, tiny_ckpt):
    net = loaded_models[str(tiny_ckpt)].net
    _, states = net.forward_rows(_ids(90), Rows([40, 30, 20], [None] * 3, CPU), keep_states=True)
    pool = SlotPool(net, 3, 64)
    taken = [pool.allocate() for _ in range(3)]
    assert taken == [0, 1, 2] and pool.free == 0
    for slot, state in zip(taken, states):
        pool.store(slot, state)
    before = [(t.data_ptr(), t[[0, 2]].clone()) for layer in pool.layers for t in vars(layer).values()]
    pool.release(1)
    assert pool.allocate() == 1
    after = [(t.data_ptr(), t[[0, 2]]) for layer in pool.layers for t in vars(layer).values()]
    for (ptr_a, a), (ptr_b, b) in zip(before, after):
        assert ptr_a == ptr_b and torch.equal(a, b)
    with pytest.raises(RuntimeError, match="no free slot"):
        pool.allocate()


def test_shared_head_runs_once_per_process_and_generation_leaves_prefix_states_alone(loaded_models, tiny_ckpt, monkeypatch):
    loaded = loaded_models[str(tiny_ckpt)]
    head_ids, head = loaded.prefixes.head()
    assert len(head_ids) % 64 == 0 and len(head_ids) >= 128  # the system prompt and instruction, chunk-aligned
    assert loaded.prompts.prefix("any query at all")[: len(head_ids)] == head_ids
    runs = []
    real = loaded.net.forward_rows
    monkeypatch.setattr(loaded.net, "forward_rows", lambda ids, rows, **kw: runs.append(rows.contexts) or real(ids, rows, **kw))
    prefixes = [loaded.prompts.prefix(q) for q in ("first query", "a second, rather longer query " * 12)]
    states = loaded.prefixes.states(prefixes)
    assert len(runs) == 1 and all(c is head for c in runs[0])  # both queries packed, both from the head
    assert [s.length for s in states] == [loaded.prefixes.cached_length(len(p)) for p in prefixes]
    saved = [[t.clone() for t in vars(layer).values()] for layer in head.layers]
    EvidenceEngine(loaded).generate([("first query", "a document"), ("first query", "another")], max_new_tokens=4)
    for layer, tensors in zip(head.layers, saved):
        for t, s in zip(vars(layer).values(), tensors):
            assert torch.equal(t, s)


def test_device_defaults_take_fla_on_cuda_in_bf16_only_where_it_is_installed(monkeypatch):
    from prism_ray.engine import fla_ops, kernels

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(fla_ops, "available", lambda: True)
    assert kernels.defaults(cuda, torch.bfloat16) == {"attention": "padded", "gated_delta_rule": "fla", "causal_conv1d": "fla",
                                                      "pointwise": "eager"}
    assert kernels.defaults(cuda, torch.float32) == {"attention": "padded", "gated_delta_rule": "prism", "causal_conv1d": "torch",
                                                     "pointwise": "eager"}
    assert kernels.defaults(cpu, torch.bfloat16) == {"attention": "sdpa", "gated_delta_rule": "prism", "causal_conv1d": "torch",
                                                     "pointwise": "eager"}
    monkeypatch.setattr(fla_ops, "available", lambda: False)
    assert kernels.defaults(cuda, torch.bfloat16)["gated_delta_rule"] == "prism"


def test_cuda_graphs_default_off_the_gpu_and_refused_there(loaded_models, tiny_ckpt):
    loaded = loaded_models[str(tiny_ckpt)]
    assert EvidenceEngine(loaded).cuda_graphs is False
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device, not cpu"):
        EvidenceEngine(loaded, cuda_graphs=True)
