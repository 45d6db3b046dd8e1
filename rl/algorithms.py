"""GRPO-family math as pure torch functions (no ray / deepspeed), see shared/specs/algorithms.md §3.

- `grpo_advantages`: group-relative advantages, with (GRPO) or without (Dr. GRPO) std scaling.
- `token_logprobs` / `entropy_from_logits`: per-token quantities from logits, one row at a time so that
  no second [B, T, V] tensor is allocated next to the logits.
- `k3_kl`: the low-variance k3 KL estimator used by GRPO.
- `policy_loss`: PPO-style clipped surrogate with asymmetric clipping (DAPO clip-higher) and the three
  loss aggregations of §3.5.

Every aggregation divides by counts of the WHOLE optimizer batch (passed in by the caller), never by
counts of the micro-batch at hand. That makes the loss, and its gradient, additive: the sum over
micro-batches / grad-accumulation steps / ranks equals the full-batch value, so the result does not
depend on how the batch was split.
"""
from __future__ import annotations

import torch
from torch import Tensor

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# exp() of log-ratios beyond this overflows or dominates everything; same bound as verl's k3.
_LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------------------- advantages
def _groups(x: Tensor, group_size: int) -> Tensor:
    if x.dim() != 1:
        raise ValueError(f"expected a flat [N] tensor, got shape {tuple(x.shape)}")
    if group_size < 1 or x.numel() % group_size != 0:
        raise ValueError(f"N={x.numel()} is not a multiple of group_size={group_size}")
    return x.view(-1, group_size)


def grpo_advantages(rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """A_i = r_i - mean(group) [/ (std(group) + eps)]; groups are contiguous runs of `group_size`."""
    r = _groups(rewards.float() if not rewards.is_floating_point() else rewards, group_size)
    if group_size == 1:
        # No baseline can be formed from a single sample (and its std would be NaN).
        return torch.zeros_like(rewards, dtype=r.dtype)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # unbiased std, as in TRL / verl
    # Groups whose rewards are all identical carry no signal; force exact zeros instead of the
    # rounding residue of (r - mean) so that they are recognised as zero-advantage groups.
    constant = (r == r[:, :1]).all(dim=1, keepdim=True)
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv.reshape(-1)


def zero_advantage_groups(advantages: Tensor, group_size: int, tol: float = 1e-8) -> Tensor:
    """Bool per group: True if every advantage in it is ~0 (the group gives no gradient)."""
    return (_groups(advantages, group_size).abs() <= tol).all(dim=1)


# ------------------------------------------------------------------------------- per-token quantities
def _scaled_row(logits_row: Tensor, temperature: float) -> Tensor:
    # float32 for the reductions even when the model runs in bf16; one [T, V] row at a time.
    row = logits_row.float()
    return row / temperature if temperature != 1.0 else row


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) at `tokens`: [B, T, V], [B, T] -> [B, T] (float32).

    log p(x) = z_x - logsumexp(z): only the selected logit and one logsumexp per position are needed,
    so the full log-softmax tensor is never materialised.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} do not match")
    rows = []
    for b in range(logits.shape[0]):
        z = _scaled_row(logits[b], temperature)
        picked = z.gather(-1, tokens[b].long().unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(z, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Full-vocabulary entropy of softmax(logits / temperature): [B, T, V] -> [B, T] (float32).

    H = -sum p log p = logsumexp(z) - sum p z, computed row by row.
    """
    rows = []
    for b in range(logits.shape[0]):
        z = _scaled_row(logits[b], temperature)
        p = torch.softmax(z, dim=-1)
        rows.append(torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1))
    return torch.stack(rows)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logp; always >= 0."""
    d = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


# --------------------------------------------------------------------------------------- policy loss
def _at_least_one(count):
    return count.clamp(min=1) if isinstance(count, Tensor) else max(count, 1)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    loss_agg: str = "token-mean",
    num_tokens: int | float | Tensor,
    num_seqs: int | float | Tensor,
    max_len: int | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss of one micro-batch, normalised by batch-global counts.

    Per token: l = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A) + kl_coef * k3, rho = pi / pi_old.
    logprobs / old_logprobs / mask / ref_logprobs: [B, T]; advantages: [B] (one per sequence).
    num_tokens / num_seqs / max_len describe the whole optimizer batch (see module docstring).
    Returns (loss, stats); stats are detached SUMS over this micro-batch's masked tokens.
    """
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; known: {', '.join(LOSS_AGG_MODES)}")
    if loss_agg == "seq-mean-token-sum-norm" and max_len is None:
        raise ValueError("loss_agg 'seq-mean-token-sum-norm' (Dr. GRPO) needs max_len")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")

    valid = mask.bool()
    m = valid.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # one advantage per sequence, shared by its tokens

    # Zero the log-ratio on padding before exp(): padded positions may hold arbitrary values and an
    # inf there would turn into NaN (inf * 0) in the masked sums and in the backward pass.
    log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)  # value 1 when on-policy, but d ratio / d logprobs = ratio still flows
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # -min(x, y) == max(-x, -y). The clip is "active" only where the clipped term is strictly larger;
    # there the loss is constant in logprobs and the token gives no gradient. On ties take the
    # unclipped branch so that its gradient is passed through in full.
    is_clipped = clipped > unclipped
    per_token = torch.where(is_clipped, clipped, unclipped)

    if ref_logprobs is not None:
        kl = torch.where(valid, k3_kl(logprobs, ref_logprobs.detach()), torch.zeros_like(logprobs))
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * kl
    else:
        kl = torch.zeros_like(logprobs)

    # Counts are clamped to >= 1 so an all-padding batch gives loss 0 instead of 0 / 0 = NaN.
    num_tokens, num_seqs = _at_least_one(num_tokens), _at_least_one(num_seqs)
    masked = torch.where(valid, per_token, torch.zeros_like(per_token))
    if loss_agg == "token-mean":
        loss = masked.sum() / num_tokens
    elif loss_agg == "seq-mean-token-mean":
        lengths = m.sum(dim=-1).clamp(min=1.0)  # each sequence's own length, whole sequence in this part
        loss = (masked.sum(dim=-1) / lengths).sum() / num_seqs
    else:  # seq-mean-token-sum-norm: constant denominator, no per-sequence length bias (Dr. GRPO)
        loss = masked.sum() / (num_seqs * _at_least_one(max_len))

    with torch.no_grad():
        stats = {
            "clipped_tokens": (is_clipped & valid).sum().to(logprobs.dtype),
            "kl_sum": kl.sum(),
            "ratio_sum": (ratio * m).sum(),
            "tokens": m.sum(),
        }
    return loss, stats
