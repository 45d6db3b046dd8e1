"""The sampling distribution a rollout draws from, and the draw itself: shared by speculative decoding
(rl/rollout/speculative.py) and its drafters (rl/rollout/drafters.py)."""
from __future__ import annotations

import torch

from rl.algo.core import truncate_logits


def target_distribution(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities sampled from, log-probs reported) [..., V] from raw logits.

    Sampling: softmax(truncate_logits(logits / T)), as rl.algo.core.token_logprobs defines it; greedy: one-hot at the
    argmax, reported at temperature 1 without truncation (what the plain greedy path reports)."""
    z = logits.float()
    if greedy:
        logp = torch.log_softmax(z, dim=-1)
        return torch.zeros_like(z).scatter_(-1, z.argmax(-1, keepdim=True), 1.0), logp
    if temperature != 1.0:
        z = z / temperature
    logp = torch.log_softmax(truncate_logits(z, top_k, top_p), dim=-1)
    return logp.exp(), logp


def sample(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of unnormalised probabilities [n, V] by inverting the float64 CDF (one uniform per row, as
    rl.rollout.worker.CategoricalSampler; right=True: a zero-probability token is never drawn)."""
    cdf = probs.double().cumsum(-1)
    draw = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, draw, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)
