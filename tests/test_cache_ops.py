"""Cache copies never alias the prefix state they come from: linear-attention layers update in place."""

from __future__ import annotations

import torch

from prism_ray.engine import load_model
from prism_ray.engine.cache_ops import merge, repeat_rows, split_rows
from prism_ray.engine.loading import prefix_state


def _tensors(cache):
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.numel():
                yield t
        for name in ("conv_states", "recurrent_states"):
            yield from (t for t in (getattr(layer, name, None) or {}).values() if isinstance(t, torch.Tensor))


def test_copies_share_no_storage_with_the_state(tiny_ckpt):
    loaded = load_model(tiny_ckpt, dtype="float32")
    a = prefix_state(loaded, loaded.prompts.prefix("first query"))
    b = prefix_state(loaded, loaded.prompts.prefix("a second, rather longer query " * 12))
    originals = {t.untyped_storage().data_ptr() for c in (a.cache, b.cache) for t in _tensors(c)}
    merged, mask = merge([a.cache, b.cache], [a.cached_len, b.cached_len], rows=[1, 0, 1])
    copies = [repeat_rows(a.cache, 1), repeat_rows(a.cache, 3), merged, *split_rows(repeat_rows(b.cache, 2), 2)]
    for copy in copies:
        assert not originals & {t.untyped_storage().data_ptr() for t in _tensors(copy)}
    assert a.cached_len < b.cached_len and mask.shape == (3, b.cached_len)
    assert mask[1].sum() == a.cached_len and mask[0].sum() == mask[2].sum() == b.cached_len
