"""A KV cache whose rows may hold holes, for speculative decoding (rl/rollout/speculative.py).

Each sequence of a batch accepts a different number of drafted tokens, so after a verifying forward the rows keep
different numbers of the positions just written. Instead of cropping every row to its own length (a DynamicCache
holds one rectangular tensor per layer), rejected positions stay in the cache and are masked out: the 2-D attention
mask marks them 0 (exactly like left padding), and the position ids of later tokens count only valid entries, so
every kept token sees precisely the keys and positions plain decoding would have given it. Holes are squeezed out
(`compact`) when they become a sizeable share of the cache or when finished rows leave the batch.
"""
from __future__ import annotations

import torch

from rl.learner.batch import expand_cache


class MaskedKV:
    """An HF causal LM with its DynamicCache and a [B, L] bool mask of the cache entries that count."""

    def __init__(self, model):
        self.model, self.cache, self.mask = model, None, None

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Cache the distinct prompts `ids` [D, P] (left-padded, `mask` [D, P]); `rows` [B]: the distinct prompt each
        sequence starts from (the group's samples share one prefill, as rl.rollout.worker's shared prefix)."""
        from transformers import DynamicCache

        mask = mask.bool()
        if ids.shape[1] == 0:
            self.cache = DynamicCache()
        else:
            out = self.model(input_ids=ids, attention_mask=mask.long(), position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                             use_cache=True, logits_to_keep=1)
            self.cache = out.past_key_values
        if rows is not None:
            if ids.shape[1]:
                self.cache = expand_cache(self.cache, rows)
            mask = mask.index_select(0, rows)
        self.mask = mask

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Run `tokens` [B, n] after the cache; `valid` [B, n] False marks filler positions (held as holes). Returns
        the logits [B, n, V]; position j of a row predicts what follows its j-th input token."""
        pos = self.mask.sum(1, keepdim=True) + valid.long().cumsum(1) - 1
        att = torch.cat([self.mask, valid.bool()], dim=1)
        out = self.model(input_ids=tokens, attention_mask=att.long(), position_ids=pos.clamp(min=0),
                         past_key_values=self.cache, use_cache=True)
        self.cache, self.mask = out.past_key_values, att
        return out.logits

    def drop_last(self, drop: torch.Tensor) -> None:
        """Turn the last n entries of each row into holes where `drop` [B, n] is True (rejected drafts)."""
        n = drop.shape[1]
        if n:
            self.mask[:, -n:] &= ~drop

    def compact(self, rows: torch.Tensor | None = None) -> None:
        """Keep only `rows` (None: all), crop columns that are holes in every row at the right edge, and squeeze the
        holes out (valid entries right-aligned, order kept) when rows were dropped or holes are >= 1/8 of the cache."""
        mask = self.mask if rows is None else self.mask.index_select(0, rows)
        length = mask.shape[1]
        if length == 0:
            self.mask = mask
            if rows is not None and self.cache.get_seq_length():
                self.cache.batch_select_indices(rows)
            return
        count = mask.sum(1)
        keep = int(count.max()) if mask.shape[0] else 0
        if rows is None and length - keep < max(8, length // 8):
            tail = int(mask.any(0).flip(0).int().argmax()) if mask.any() else length  # all-hole columns at the end
            if tail:
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, :length - tail], layer.values[:, :, :length - tail]
                self.mask = mask[:, :length - tail]
            return
        # A stable sort of the 0/1 mask puts each row's holes first and its valid entries after, in order.
        order = torch.sort(mask.int(), dim=1, stable=True).indices[:, length - keep:]
        for layer in self.cache.layers:
            keys, values = layer.keys, layer.values
            if rows is not None:
                keys, values = keys.index_select(0, rows), values.index_select(0, rows)
            index = order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
            layer.keys, layer.values = keys.gather(2, index), values.gather(2, index)
        self.mask = mask.gather(1, order)
