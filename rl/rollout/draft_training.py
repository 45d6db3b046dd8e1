"""Online training of the draft model (drafter `model`) on the policy's own rollouts, as TLT (Taming the Long Tail,
2025) does: RL moves the policy every step, and a frozen drafter's acceptance falls as it drifts away.

The rollout worker hands every batch it generates to `DraftDistiller.observe`; the distiller keeps the latest
samples and, every `distill_every` generate calls, takes a few optimiser steps on the draft model. The loss is the
cross-entropy of the draft on the policy's sampled response tokens: on samples of the policy that is, up to the
policy's own entropy, a Monte Carlo estimate of KL(policy || draft), the divergence whose reduction raises the
speculative-sampling acceptance sum_x min(p(x), q(x)). Training the draft cannot bias the rollouts: acceptance
corrects for whatever the draft proposes, so only the speed changes. Each round bumps `version`, the draft's
counterpart of the policy's weights version.
"""
from __future__ import annotations

import collections

import torch
import torch.nn.functional as F


class DraftDistiller:
    def __init__(self, model: torch.nn.Module, every: int, steps: int, lr: float, buffer: int, batch_size: int,
                 pad_id: int, seed: int = 0):
        self.model, self.every, self.steps, self.batch_size, self.pad_id = model, every, steps, batch_size, pad_id
        self.samples: collections.deque[tuple[list[int], int]] = collections.deque(maxlen=buffer)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(seed)
        self.calls, self.version = 0, 0
        self.last: dict = {}

    def observe(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> dict:
        """Keep one generate call's samples; every `every` calls, train. Returns the round's stats ({} if none)."""
        for p, r in zip(prompt_ids, response_ids):
            if r:
                self.samples.append((list(p) + list(r), len(p)))
        self.calls += 1
        if self.calls % self.every or not self.samples:
            return {}
        return self.train()

    def train(self) -> dict:
        losses = []
        with torch.enable_grad():  # generate runs under no_grad
            self.model.train()
            for _ in range(self.steps):
                idx = torch.randint(len(self.samples), (min(self.batch_size, len(self.samples)),),
                                    generator=self.generator).tolist()
                loss = self._loss([self.samples[i] for i in idx])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                losses.append(float(loss.detach()))
            self.model.eval()
        self.version += 1
        self.last = {"draft_loss_first": losses[0], "draft_loss_last": losses[-1], "draft_version": self.version}
        return self.last

    def _loss(self, batch: list[tuple[list[int], int]]) -> torch.Tensor:
        """Mean next-token cross-entropy over response tokens (prompt tokens and right padding are context only)."""
        device = next(self.model.parameters()).device
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (seq, prompt_len) in enumerate(batch):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
            labels[i, prompt_len:len(seq)] = ids[i, prompt_len:len(seq)]
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(device),
                               ignore_index=-100)
