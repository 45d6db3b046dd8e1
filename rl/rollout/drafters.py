"""Drafters for speculative decoding (rl/rollout/speculative.py): what proposes the k tokens the policy verifies.

The interface (`Drafter`) is what the decode loop calls; a drafter returns, per sequence, up to k tokens and,
unless it is deterministic, the distribution q each was drawn from (the acceptance rule needs q(x); a deterministic
drafter is a point mass, q(x) = 1). Two implementations:

- `NgramDrafter`: prompt-lookup decoding (Saxena 2023; the n-gram drafter of vLLM and transformers'
  `prompt_lookup_num_tokens`): find the latest earlier occurrence of the last n tokens of prompt + response, propose
  what followed it. No model, no forward; it wins where chains of thought copy the problem or repeat themselves.
- `ModelDrafter`: a small causal LM with the policy's vocabulary (Leviathan et al. 2023), sampling its drafts from
  its own temperature / top-k / top-p shaped distribution, with its own KV cache rolled back like the policy's.
  TLT (Taming the Long Tail, 2025) trains such a drafter online on the policy's rollouts: rl/rollout/draft_training.py
  (`rollout.speculative.distill_every`).
"""
from __future__ import annotations

import numpy as np
import torch

from rl.rollout.distributions import sample, target_distribution
from rl.rollout.kv import MaskedKV


class Drafter:
    """Called by the decode loop, in this order each step: `propose` (only on steps that speculate), then `commit`;
    `select` when finished sequences leave the batch. Rows are the active sequences, in the loop's order."""
    forwards = 0  # draft-model forwards run (stats)

    def start(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, prompt_lens: list[int]) -> None:
        """Before the first step: the prefill tensors the policy cached (every prompt token but the last)."""

    def propose(self, seqs: list[list[int]], limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor | None]:
        """Draft at most `limit[i]` tokens after `seqs[i]` (prompt + response so far). Returns drafts [n, K] (long,
        filler after each row's length), lengths [n] and q [n, K, V] (None for a point mass)."""
        raise NotImplementedError

    def commit(self, accepted: torch.Tensor) -> None:
        """After verification: row i kept its first `accepted[i]` drafts (only called after `propose`)."""

    def select(self, rows: torch.Tensor) -> None:
        """Only `rows` stay in the batch."""


def pack(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token lists -> [n, max len] long tensor (0 after each row's end) and the lengths [n]."""
    width = max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out, torch.tensor([len(r) for r in rows], dtype=torch.long)


class NgramDrafter(Drafter):
    def __init__(self, ngram_min: int = 1, ngram_max: int = 3):
        self.sizes = range(ngram_max, ngram_min - 1, -1)  # longest match first: fewer, better drafts

    def lookup(self, seq: list[int], k: int) -> list[int]:
        """The `k` tokens that followed the latest earlier occurrence of the longest matching suffix ([] if none)."""
        a = np.asarray(seq)
        for n in self.sizes:
            if k <= 0 or len(a) <= n:
                continue
            # Windows a[j:j+n] with j + n <= len - 1: each has a continuation, and none is the suffix itself.
            windows = np.lib.stride_tricks.sliding_window_view(a[:-1], n)
            hits = np.flatnonzero((windows == a[-n:]).all(axis=1))
            if hits.size:
                j = int(hits[-1]) + n  # the latest occurrence: chains of thought repeat what they wrote last
                return a[j:j + k].tolist()
        return []

    def propose(self, seqs, limit):
        drafts, lengths = pack([self.lookup(s, k) for s, k in zip(seqs, limit.tolist())])
        return drafts.to(limit.device), lengths.to(limit.device), None


class ModelDrafter(Drafter):
    """A draft LM. Its cache holds a prefix of each sequence (`cached` tokens); what the policy emitted since is fed
    first on the next proposal (left-filled with holes, as rows differ), then one drafted token per forward."""

    def __init__(self, model, vocab_size: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 greedy: bool = False):
        self.kv, self.vocab = MaskedKV(model), vocab_size
        self.shape = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
        self.forwards, self.cached, self._drafted = 0, None, 0

    def start(self, ids, mask, rows, prompt_lens):
        self.kv.prefill(ids, mask, rows)
        self.cached = torch.tensor(prompt_lens, dtype=torch.long, device=ids.device) - 1

    def _distribution(self, logits: torch.Tensor) -> torch.Tensor:

        logits = logits.float()
        if logits.shape[-1] != self.vocab:  # a padded or smaller draft vocabulary: only the policy's ids can be drafted
            pad = torch.full((*logits.shape[:-1], max(0, self.vocab - logits.shape[-1])), float("-inf"),
                             device=logits.device)
            logits = torch.cat([logits[..., :self.vocab], pad], dim=-1)
        return target_distribution(logits, **self.shape)[0]

    def propose(self, seqs, limit):

        k, dev = int(limit.max()), limit.device
        pending = [s[c:] for s, c in zip(seqs, self.cached.tolist())]
        width = max(map(len, pending))
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        valid = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, p in enumerate(pending):  # right-aligned: the last column is each row's newest token
            tokens[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, width - len(p):] = True
        tokens, valid = tokens.to(dev), valid.to(dev)
        self.cached += torch.tensor([len(p) for p in pending], device=dev)
        drafts, qs = [], []
        logits = self.kv.forward(tokens, valid)[:, -1]
        for j in range(k):
            q = self._distribution(logits)
            drafts.append(sample(q))
            qs.append(q)
            if j + 1 < k:  # the last draft needs no forward: nothing drafted after it
                ones = torch.ones(len(seqs), 1, dtype=torch.bool, device=dev)
                logits = self.kv.forward(drafts[-1][:, None], ones)[:, -1]
        self.forwards += k
        self._drafted = k
        drafts = torch.stack(drafts, 1)
        lengths = limit.clamp(max=k)
        if self.shape["greedy"]:
            return drafts, lengths, None  # argmax drafts: a point mass
        return drafts, lengths, torch.stack(qs, 1)

    def commit(self, accepted):
        # The cache got drafts 1..k-1; those beyond the accepted ones are holes now.
        written = self._drafted - 1
        if written > 0:
            kept = accepted.clamp(max=written)
            self.kv.drop_last(torch.arange(written, device=kept.device)[None, :] >= kept[:, None])
            self.cached += kept
        self.kv.compact()

    def select(self, rows):
        self.kv.compact(rows)
        self.cached = self.cached.index_select(0, rows)
