"""GRPO-family math as pure torch functions (no ray / deepspeed), see docs/algorithms.md ("GRPO", "FGO").

- `grpo_advantages`: group-relative advantages, with (GRPO) or without (Dr. GRPO) std scaling.
- `fgo_rewards` / `fgo_advantages`: FGO's length- and entropy-weighted subgroup rewards, and the two entropy
  proxies FGO can weight by (`sampled_token_entropy`, `mean_token_entropy`).
- `token_logprobs` / `entropy_from_logits`: per-token quantities from logits, one row at a time so that
  no second [B, T, V] tensor is allocated next to the logits.
- `k3_kl`: the low-variance k3 KL estimator used by GRPO.
- `policy_loss`: PPO-style clipped surrogate with asymmetric clipping (DAPO clip-higher) and the three
  loss aggregations (docs/algorithms.md, "Loss aggregation"); `tis_weights` (truncated importance correction for
  a rollout engine whose numerics differ) and `logprob_mismatch` (the training-inference mismatch monitor).
- `truncate_logits`: the top-k / top-p set a truncating sampler draws from, applied to the learner's logits too.
- `sft_loss`: supervised NLL of the trained tokens (SFT cold start), token-mean over the whole batch.

Every aggregation divides by counts of the WHOLE optimizer batch (passed in by the caller), never by
counts of the micro-batch at hand. That makes the loss, and its gradient, additive: the sum over
micro-batches / grad-accumulation steps / ranks equals the full-batch value, so the result does not
depend on how the batch was split.
"""
from __future__ import annotations

import torch
from torch import Tensor

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


# ------------------------------------------------------------------------------------------------ FGO
def fgo_rewards(correct: Tensor, lengths: Tensor, entropies: Tensor, group_size: int, alpha: float = 0.01,
                beta: float = 1.0, eps: float = 1e-6, uniform_wrong: bool = False) -> Tensor:
    """FGO's fine-grained rewards R_i = r_i * W_i (docs/algorithms.md, "FGO"), groups contiguous.

    Each group splits into correct (r=+1) and incorrect (r=-1) subgroups; inside a subgroup
      correct:   x_i = (mean L / L_i)^alpha * (mean H / H_i)^beta
      incorrect: x_i = (L_i / mean L)^alpha * (mean H / H_i)^beta
    and W = softmax(x) over the subgroup, so every subgroup's |R| sums to 1 and a singleton gets R = +-1.
    uniform_wrong: the incorrect subgroup gets equal weights (x_i = 1), so only the correct subgroup is reweighted.
    With the summed-entropy proxy the incorrect subgroup's weighting favours *longer* wrong answers, which turns
    FGO's length pressure around on a mostly-wrong model (docs/algorithms.md, "The sign condition"); GFPO-style
    length selection likewise acts on correct responses only.
    Computed in float64: with alpha = 0.01 the length factors differ from 1 in the 3rd decimal, and float32
    rounding would be a visible fraction of the weight differences.
    """
    ok = _groups(correct.bool(), group_size)
    L = _groups(lengths.double(), group_size)
    H = _groups(entropies.double(), group_size)
    if (L < 0).any() or (H < 0).any():
        raise ValueError("FGO lengths and entropies must be non-negative")
    R = torch.zeros_like(L)
    for sign, member in ((1.0, ok), (-1.0, ~ok)):
        n = member.sum(dim=1, keepdim=True)
        has = n > 0
        mean_L = torch.where(member, L, 0.0).sum(dim=1, keepdim=True) / n.clamp(min=1)
        mean_H = torch.where(member, H, 0.0).sum(dim=1, keepdim=True) / n.clamp(min=1)
        length_factor = mean_L / (L + eps) if sign > 0 else L / (mean_L + eps)
        x = length_factor ** alpha * (mean_H / (H + eps)) ** beta
        if sign < 0 and uniform_wrong:
            x = torch.ones_like(x)
        x = torch.where(member, x, float("-inf"))  # softmax over the subgroup's members only
        w = torch.softmax(torch.where(has, x, 0.0), dim=1)
        R = torch.where(member, sign * w, R)
    return R.reshape(-1)


def fgo_advantages(correct: Tensor, lengths: Tensor, entropies: Tensor, group_size: int, alpha: float = 0.01,
                   beta: float = 1.0, scale_by_std: bool = False, uniform_wrong: bool = False) -> Tensor:
    """FGO advantages A_i = R_i - mean_group(R) [/ (std_group(R) + 1e-4)], float32, groups contiguous.

    scale_by_std=False is the poster's Dr.GRPO form (the default); True is the released code's (stock TRL 0.16:
    unbiased std + 1e-4). Mixed groups have mean R exactly 0 (each subgroup's weights sum to 1), while all-correct /
    all-wrong groups keep non-zero advantages unless their members are indistinguishable (docs/algorithms.md, "FGO").
    """
    R = _groups(fgo_rewards(correct, lengths, entropies, group_size, alpha, beta, uniform_wrong=uniform_wrong),
                group_size)
    adv = R - R.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:
        adv = adv / (R.std(dim=1, keepdim=True) + 1e-4)
    if group_size == 1:
        adv = torch.zeros_like(adv)
    constant = (R == R[:, :1]).all(dim=1, keepdim=True)  # e.g. identical lengths and entropies
    return torch.where(constant, torch.zeros_like(adv), adv).reshape(-1).float()


def fgo_weight_spread(rewards: Tensor, correct: Tensor, group_size: int) -> float:
    """Mean over subgroups of >= 2 members of (max W - min W) * |S|: 0 when FGO weights are uniform, 1 when the
    largest weight exceeds the smallest by one uniform share. A diagnostic for how much FGO reshapes credit."""
    spreads = fgo_subgroup_spreads(rewards, correct, group_size)
    return float(spreads.mean()) if spreads.numel() else 0.0


def fgo_subgroup_spreads(rewards: Tensor, correct: Tensor, group_size: int) -> Tensor:
    """(max W - min W) * |S| of every subgroup of >= 2 members: the correct subgroups of all groups, then the
    incorrect ones (float64)."""
    W = _groups(rewards.abs().double(), group_size)
    ok = _groups(correct.bool(), group_size)
    spreads = []
    for member in (ok, ~ok):
        n = member.sum(dim=1)
        big = n >= 2
        if big.any():
            hi = torch.where(member, W, float("-inf")).max(dim=1).values
            lo = torch.where(member, W, float("inf")).min(dim=1).values
            spreads.append(((hi - lo) * n)[big])
    return torch.cat(spreads) if spreads else torch.zeros(0, dtype=torch.float64)


def sampled_token_entropy(logprobs: Tensor, mask: Tensor) -> Tensor:
    """FGO's released entropy proxy per response: sum_t -p_t log p_t of the SAMPLED token, p_t = exp(logprob).
    [B, T] log-probs of the sampled tokens and their mask -> [B]. Not length-normalised: it grows with length."""
    lp = torch.where(mask.bool(), logprobs.double(), 0.0)
    return (-(lp.exp() * lp)).sum(dim=-1).to(logprobs.dtype)


def mean_token_entropy(token_entropy: Tensor, mask: Tensor) -> Tensor:
    """Full-vocabulary entropy averaged over each response's tokens: [B, T] (see entropy_from_logits) -> [B]."""
    m = mask.to(token_entropy.dtype)
    return (token_entropy * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1)


# ------------------------------------------------------------------------------- per-token quantities
def _scaled_row(logits_row: Tensor, temperature: float) -> Tensor:
    # float32 for the reductions even when the model runs in bf16; one [T, V] row at a time.
    row = logits_row.float()
    return row / temperature if temperature != 1.0 else row


def truncate_logits(z: Tensor, top_k: int = 0, top_p: float = 1.0, keep: Tensor | None = None) -> Tensor:
    """Temperature-scaled logits [..., V] with every token outside the top-k, then top-p, set at -inf: the set
    transformers' TopKLogitsWarper and TopPLogitsWarper keep (same ties, at least one token), so softmax of the
    result is the distribution a truncating sampler draws from, which the continuous-batching and vLLM backends
    report log-probs of. top_k 0 / top_p 1 return `z` unchanged (no cost when sampling is not truncated).

    `keep` [...] (token ids): never masked. Passing the sampled tokens means a learner whose weights moved since
    the rollout (several iterations, a stale batch) gives a sampled token a small probability instead of -inf;
    at the rollout's own weights the sampled token is always in the set, so nothing changes there.
    """
    if top_k <= 0 and top_p >= 1.0:
        return z
    remove = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
    with torch.no_grad():  # which tokens survive is a selection, not a function to differentiate
        if top_k > 0:
            kth = torch.topk(z, min(top_k, z.shape[-1]), dim=-1).values[..., -1:]
            remove = z < kth
        if top_p < 1.0:
            ordered, order = torch.sort(z.masked_fill(remove, float("-inf")), dim=-1)  # ascending, as transformers
            drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
            drop[..., -1:] = False  # min_tokens_to_keep = 1
            remove = remove | drop.scatter(-1, order, drop)
        if keep is not None:
            remove = remove.scatter(-1, keep.long().unsqueeze(-1), False)
    return z.masked_fill(remove, float("-inf"))


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> Tensor:
    """log softmax(truncate(logits / temperature)) at `tokens`: [B, T, V], [B, T] -> [B, T] (float32).

    top_k / top_p: the sampler's truncation (truncate_logits), so the log-probs describe the distribution that
    was sampled, as every rollout backend reports it. log p(x) = z_x - logsumexp(z): only the selected logit and
    one logsumexp per position are needed, so the full log-softmax tensor is never materialised.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} do not match")
    rows = []
    for b in range(logits.shape[0]):
        z = truncate_logits(_scaled_row(logits[b], temperature), top_k, top_p, keep=tokens[b])
        picked = z.gather(-1, tokens[b].long().unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(z, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Entropy of softmax(truncate(logits / temperature)): [B, T, V] -> [B, T] (float32); without truncation the
    full-vocabulary entropy.

    H = -sum p log p = logsumexp(z) - sum p z, computed row by row (masked tokens: p = 0, no 0 * -inf).
    """
    rows = []
    for b in range(logits.shape[0]):
        z = truncate_logits(_scaled_row(logits[b], temperature), top_k, top_p)
        p = torch.softmax(z, dim=-1)
        pz = torch.where(p > 0, p * z, torch.zeros_like(z))
        rows.append(torch.logsumexp(z, dim=-1) - pz.sum(dim=-1))
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
    token_weights: Tensor | None = None,
    importance_sampling_level: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss of one micro-batch, normalised by batch-global counts.

    Per token: l = -w min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A) + kl_coef * k3, rho = pi / pi_old,
    or rho = GSPO's sequence ratio (importance_sampling_level `sequence` / `sequence_token`, see
    importance_log_weights),
    w = token_weights (detached; e.g. tis_weights, the truncated importance correction; None: 1).
    logprobs / old_logprobs / mask / ref_logprobs / token_weights: [B, T]; advantages: [B] (one per sequence).
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
    if importance_sampling_level != "token":
        log_ratio = importance_log_weights(log_ratio, logprobs, m, importance_sampling_level)
    ratio = torch.exp(log_ratio)  # value 1 when on-policy, but d ratio / d logprobs = ratio still flows
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # -min(x, y) == max(-x, -y). The clip is "active" only where the clipped term is strictly larger;
    # there the loss is constant in logprobs and the token gives no gradient. On ties take the
    # unclipped branch so that its gradient is passed through in full.
    is_clipped = clipped > unclipped
    per_token = torch.where(is_clipped, clipped, unclipped)
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)

    if ref_logprobs is not None:
        kl = torch.where(valid, k3_kl(logprobs, ref_logprobs.detach()), torch.zeros_like(logprobs))
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * kl
    else:
        kl = torch.zeros_like(logprobs)

    # Counts are clamped to >= 1 so an all-padding batch gives loss 0 instead of 0 / 0 = NaN.
    num_tokens, num_seqs = _at_least_one(num_tokens), _at_least_one(num_seqs)
    masked = torch.where(valid, per_token, torch.zeros_like(per_token))
    loss = LOSS_AGGREGATIONS[loss_agg](masked, m, num_tokens, num_seqs, max_len)

    with torch.no_grad():
        stats = {
            "clipped_tokens": (is_clipped & valid).sum().to(logprobs.dtype),
            "kl_sum": kl.sum(),
            "ratio_sum": (ratio * m).sum(),
            "tokens": m.sum(),
        }
    return loss, stats


# Loss aggregations by name (algorithm.loss_agg): per-token losses (0 on padding) and the mask of one micro-batch,
# and the whole batch's counts, to the micro-batch's share of the loss (docs/algorithms.md, "Loss aggregation").
def _token_mean(masked: Tensor, mask: Tensor, num_tokens, num_seqs, max_len) -> Tensor:
    return masked.sum() / num_tokens


def _seq_mean_token_mean(masked: Tensor, mask: Tensor, num_tokens, num_seqs, max_len) -> Tensor:
    lengths = mask.sum(dim=-1).clamp(min=1.0)  # each sequence's own length, whole sequence in this part
    return (masked.sum(dim=-1) / lengths).sum() / num_seqs


def _seq_mean_token_sum_norm(masked: Tensor, mask: Tensor, num_tokens, num_seqs, max_len) -> Tensor:
    # A constant denominator: no per-sequence length bias (Dr. GRPO).
    return masked.sum() / (num_seqs * _at_least_one(max_len))


LOSS_AGGREGATIONS = {"token-mean": _token_mean, "seq-mean-token-mean": _seq_mean_token_mean,
                     "seq-mean-token-sum-norm": _seq_mean_token_sum_norm}
LOSS_AGG_MODES = tuple(LOSS_AGGREGATIONS)


def importance_log_weights(log_ratio: Tensor, logprobs: Tensor, mask: Tensor, level: str) -> Tensor:
    """log of the PPO ratio per token, [B, T], for GSPO (Zheng et al. 2025, arXiv:2507.18071; TRL's
    `importance_sampling_level`). log_ratio: log pi - log pi_old, 0 on padding; mask: float [B, T].

    `sequence`: log s_i = mean over the response of log_ratio, the same value on every token of it (the
    length-normalised sequence likelihood ratio, so long and short responses share one clip range).
    `sequence_token` (GSPO-token): sg[log s_i] + log pi_t - sg[log pi_t]: the value is s_i, the gradient per token
    s_i * grad log pi_t, which leaves room for token-level advantages; with one advantage per response it equals
    GSPO.
    """
    if level == "token":
        return log_ratio
    if level not in ("sequence", "sequence_token"):
        raise ValueError(f"unknown importance_sampling_level {level!r}; known: token, sequence, sequence_token")
    seq = (log_ratio * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
    if level == "sequence":
        return seq.expand_as(log_ratio)
    # Zero on padding, where logprobs may be -inf (inf - inf would be NaN, and NaN survives a masked backward).
    return seq.detach() + torch.where(mask.bool(), logprobs - logprobs.detach(), torch.zeros_like(logprobs))


def tis_weights(learner_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (OpenRLHF's `tis`, verl's token-level rollout correction): per token
    min(pi_learner / pi_rollout, cap), detached, 0 on padding. When the rollout engine's numerics differ from the
    learner's (vLLM's kernels, bf16), the tokens were drawn from pi_rollout while the gradient is pi_learner's;
    the weight corrects for that, and the cap bounds the variance a token the engine under-rates would add."""
    with torch.no_grad():
        valid = mask.bool()
        log_w = torch.where(valid, learner_logprobs - rollout_logprobs, torch.zeros_like(learner_logprobs))
        w = torch.exp(log_w.clamp(max=_LOG_RATIO_CLAMP)).clamp(max=cap)
        return torch.where(valid, w, torch.zeros_like(w))


def logprob_mismatch(learner_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Training-inference mismatch of one micro-batch: |log pi_rollout - log pi_learner| over its response tokens,
    as detached `sum`, `max` and `tokens` (summed / maxed over micro-batches and ranks by the caller). A rollout
    log-prob that is not finite (an engine bug: vLLM 0.32's speculative decoding returns NaN for some drafted tokens)
    is counted in `nonfinite` and left out of the others, so one NaN does not hide the size of the rest."""
    with torch.no_grad():
        valid = mask.bool()
        finite = torch.isfinite(rollout_logprobs)
        counted = valid & finite
        diff = torch.where(counted, (learner_logprobs.float() - rollout_logprobs.float()).abs(),
                           torch.zeros_like(learner_logprobs, dtype=torch.float32))
        return {"sum": diff.sum(), "max": diff.max() if diff.numel() else diff.new_zeros(()),
                "tokens": counted.sum().float(), "nonfinite": (valid & ~finite).sum().float()}


# ------------------------------------------------------------------------- preferences: TODO and DPO
# Tie-rank Oriented DPO (docs/algorithms.md, "TODO and DPO"; Guo et al., arXiv:2411.02442). Inputs are SUMMED
# response log-probs per sequence (policy and frozen reference, chosen and rejected); mu is the DPO implicit-reward
# difference.
# `num_pairs` plays the role of policy_loss's batch-global counts: pass the pair count of the whole optimizer
# batch and every micro-batch's loss is sum / num_pairs, so the pieces add up to the batch mean.

def preference_margin(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                      ref_rejected_logps: Tensor, beta: float = 0.01) -> Tensor:
    """mu = beta * ((log pi(y1) - log ref(y1)) - (log pi(y2) - log ref(y2))), per pair."""
    return beta * ((policy_chosen_logps - ref_chosen_logps.detach())
                   - (policy_rejected_logps - ref_rejected_logps.detach()))


def tobt_probabilities(mu: Tensor, alpha: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """Tie-rank Oriented Bradley-Terry: (P(y1 > y2), P(y2 > y1), P(y1 = y2)) for margins `mu`; they sum to 1.

    Computed in log space: P(win) = sigma(mu - alpha), P(lose) = sigma(-mu - alpha) and
    P(tie) = (e^{2 alpha} - 1) sigma(mu - alpha) sigma(-mu - alpha).
    """
    log_win = torch.nn.functional.logsigmoid(mu - alpha)
    log_lose = torch.nn.functional.logsigmoid(-mu - alpha)
    log_tie = _log_expm1_2alpha(alpha, mu) + log_win + log_lose
    return log_win.exp(), log_lose.exp(), log_tie.exp()


def _log_expm1_2alpha(alpha: float, like: Tensor) -> Tensor:
    # log(e^{2 alpha} - 1); -inf at alpha = 0 (ties impossible), which makes the tie loss +inf as it should.
    return torch.log(torch.expm1(torch.tensor(2.0 * alpha, dtype=like.dtype, device=like.device)))


def todo_losses(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                ref_rejected_logps: Tensor, tie: Tensor, beta: float = 0.01, alpha: float = 0.5) -> Tensor:
    """Per-pair TODO loss: -log sigma(mu - alpha) for preferences, -log P(tie) for ties (tie = 1/True).

    -log P(tie) = -log(e^{2 alpha} - 1) + softplus(mu + alpha) + softplus(alpha - mu): symmetric in mu, so the
    order of a tied pair does not matter, and its gradient vanishes at mu = 0.
    """
    mu = preference_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    sp = torch.nn.functional.softplus
    l_pref = sp(alpha - mu)  # == -logsigmoid(mu - alpha)
    tie = tie.to(torch.bool)
    if not tie.any():  # alpha = 0 is then exactly DPO; skip the (infinite at alpha = 0) tie branch entirely
        return l_pref
    l_tie = sp(mu + alpha) + sp(alpha - mu) - _log_expm1_2alpha(alpha, mu)
    return torch.where(tie, l_tie, l_pref)


def todo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
              ref_rejected_logps: Tensor, tie: Tensor, beta: float = 0.01, alpha: float = 0.5,
              num_pairs: int | float | Tensor | None = None) -> Tensor:
    """Mean TODO loss over the pairs (or sum / num_pairs for a micro-batch of a larger batch)."""
    losses = todo_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, tie,
                         beta, alpha)
    return losses.sum() / _at_least_one(losses.numel() if num_pairs is None else num_pairs)


def dpo_losses(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, beta: float = 0.01) -> Tensor:
    """Per-pair plain DPO (sigmoid) loss -log sigma(mu) = softplus(-mu)."""
    mu = preference_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return torch.nn.functional.softplus(-mu)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.01,
             num_pairs: int | float | Tensor | None = None) -> Tensor:
    """Plain DPO loss, mean over the pairs (or sum / num_pairs)."""
    losses = dpo_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return losses.sum() / _at_least_one(losses.numel() if num_pairs is None else num_pairs)


def preference_correct(mu: Tensor, tie: Tensor, alpha: float = 0.5) -> dict[str, Tensor]:
    """Per-pair correctness (bool) of the two preference evaluations (docs/algorithms.md, "TODO and DPO").

    `tobt`: the argmax of the three TOBT probabilities is the labelled outcome (win for a preference pair,
    tie for a tied pair); `sign`: mu > 0 (DPO's rule, preference pairs only). Both need a STRICT winner, so
    the start of training (policy = reference, mu = 0, win and lose equally likely) scores 0, not 1.
    """
    p_win, p_lose, p_tie = tobt_probabilities(mu, alpha)
    tie = tie.to(torch.bool)
    win_right = (p_win > p_lose) & (p_win > p_tie)
    tie_right = (p_tie > p_win) & (p_tie > p_lose)
    return {"tobt": torch.where(tie, tie_right, win_right), "sign": mu > 0}


# ------------------------------------------------------------------------------------ supervised fine-tuning
def sft_loss(logprobs: Tensor, mask: Tensor, num_tokens: int | float | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of the trained tokens, summed and divided by the trained-token count of the WHOLE
    optimizer batch (`num_tokens`, from the caller): the token-mean of policy_loss, so micro-batches and ranks add up
    to the batch mean whatever the split (docs/algorithms.md, "SFT").

    logprobs / mask: [B, T]; mask is the per-token loss mask (0 on prompt, context and padding; it may carry an
    example weight). Returns (loss, stats) with detached SUMS over this micro-batch: `nll_sum`, `tokens`.
    """
    m = mask.to(logprobs.dtype)
    # torch.where, not a product: padded positions may hold -inf, and -inf * 0 would be NaN.
    nll = torch.where(m != 0, -logprobs * m, torch.zeros_like(logprobs))
    loss = nll.sum() / _at_least_one(num_tokens)
    with torch.no_grad():
        stats = {"nll_sum": nll.sum().detach(), "tokens": m.sum()}
    return loss, stats
