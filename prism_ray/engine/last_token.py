"""A backbone forward that runs the final decoder layer only where the score reads it.

A score needs the final hidden state of one position per row. Every earlier layer must run on all
positions (later positions attend to them), but in the final layer the other positions' outputs
are never read: only their keys and values are. So the final layer computes K/V for all positions
and its query, output projection and MLP (most of its cost) for the last real token of each row.

This reuses the model's own modules: the trunk is the backbone minus its last layer (sharing the
weights), and the last layer is called as Hugging Face defines it, on one token per row, with its
cache holding the K/V of everything before that token.
"""

from __future__ import annotations

import copy
import sys

import torch


def _trunk(backbone: torch.nn.Module) -> torch.nn.Module:
    """The backbone without its final layer and final norm; shares every weight."""
    trunk = copy.copy(backbone)
    trunk._modules = dict(backbone._modules)
    trunk._modules["layers"] = backbone.layers[:-1]
    trunk._modules["norm"] = torch.nn.Identity()
    trunk.config = copy.deepcopy(backbone.config)
    trunk.config.num_hidden_layers -= 1
    if getattr(trunk.config, "layer_types", None):
        trunk.config.layer_types = list(trunk.config.layer_types[:-1])
    return trunk


class LastTokenForward:
    """`__call__(ids, positions, cache, cached_len, last, prefix_mask)` -> final-norm hidden state per
    row, (B, H).

    `ids` are right-padded rows continuing from a cache of `cached_len` slots; `last[b]` is the index
    of row b's last real token. `prefix_mask` (B, cached_len; 1 = real) marks left pads in the cache
    when rows of several queries with different prefix lengths share the batch; None: every slot is
    real. Falls back to the plain forward when the final layer is not full attention (no released
    Prism checkpoint is built that way).
    """

    def __init__(self, backbone: torch.nn.Module):
        self.backbone = backbone
        last = backbone.layers[-1]
        self.enabled = hasattr(last, "self_attn") and not hasattr(last, "linear_attn")
        if self.enabled:
            self.trunk = _trunk(backbone)
            self._rope = sys.modules[type(last.self_attn).__module__].apply_rotary_pos_emb

    def __call__(self, ids, positions, cache, cached_len: int, last: torch.Tensor,
                 prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
        rows = torch.arange(ids.shape[0], device=ids.device)
        width = ids.shape[1]
        # Without left pads in the cache no mask is needed: a causal model never lets a real token
        # see the right pads after it. With them, every layer must mask them out.
        attention_mask = None
        if prefix_mask is not None:
            tail = (torch.arange(width, device=ids.device)[None] <= last[:, None]).long()
            attention_mask = torch.cat([prefix_mask.long(), tail], dim=1)
        if not self.enabled:
            out = self.backbone(input_ids=ids, position_ids=positions, attention_mask=attention_mask, cache=cache,
                                use_cache=True)
            return out.last_hidden_state[rows, last]
        bb = self.backbone
        hidden = self.trunk(input_ids=ids, position_ids=positions, attention_mask=attention_mask, cache=cache,
                            use_cache=True).last_hidden_state
        layer = bb.layers[-1]
        self._append_kv(layer, hidden, positions, cache)

        h_last = hidden[rows, last][:, None]
        pos_last = positions[rows, last][:, None]
        # Row b sees the cached prefix, its own tokens before `last[b]` (not its pads), and itself,
        # which the layer appends to the cache as the final slot.
        kv = torch.arange(cached_len + width + 1, device=ids.device)
        mask = (kv[None] < cached_len + last[:, None]) | (kv[None] == cached_len + width)
        if prefix_mask is not None:
            mask[:, :cached_len] &= prefix_mask.bool()
        out = layer(
            hidden_states=h_last, position_embeddings=bb.rotary_emb(h_last, pos_last),
            attention_mask=mask[:, None, None, :], position_ids=pos_last, cache=cache, use_cache=True,
        )
        if isinstance(out, tuple):
            out = out[0]
        return bb.norm(out)[:, 0]

    def _append_kv(self, layer, hidden, positions, cache) -> None:
        """Put the final layer's K/V of every position into its cache, as its attention would."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        batch, width, _ = x.shape
        cos, sin = self.backbone.rotary_emb(x, positions)
        k = attn.k_norm(attn.k_proj(x).view(batch, width, -1, attn.head_dim)).transpose(1, 2)
        v = attn.v_proj(x).view(batch, width, -1, attn.head_dim).transpose(1, 2)
        _, k = self._rope(k, k, cos, sin)
        cache.update(k, v, attn.layer_idx)
