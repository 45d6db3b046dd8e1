"""Tests for rl/algo/core.py against hand-computed numbers (arithmetic in the comments)."""
import math

import pytest
import torch

from rl.algo.core import (
    LOSS_AGG_MODES,
    entropy_from_logits,
    grpo_advantages,
    k3_kl,
    policy_loss,
    token_logprobs,
    zero_advantage_groups,
)


# ----------------------------------------------------------------------------------------- advantages
def test_grpo_advantages_hand_group_with_and_without_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 0.5 -> r - mean = [.5, -.5, -.5, .5]
    #          unbiased var = (4 * 0.25) / 3 = 1/3, std = 0.5773503
    #          scaled = 0.5 / (0.5773503 + 1e-6) = 0.8660239
    # group 2: all equal -> 0
    std = math.sqrt(1 / 3)
    s = 0.5 / (std + 1e-6)
    assert torch.allclose(grpo_advantages(r, 4), torch.tensor([s, -s, -s, s, 0, 0, 0, 0]), atol=1e-7)
    assert abs(s - 0.8660239) < 1e-6
    assert torch.equal(grpo_advantages(r, 4, scale_by_std=False),
                       torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    # eps enters the denominator: eps = 1 -> 0.5 / 1.5773503 = 0.3169873
    assert abs(grpo_advantages(r, 4, eps=1.0)[0].item() - 0.3169873) < 1e-6


def test_grpo_advantages_constant_groups_are_exact_zeros():
    # In float32, mean([0.9] * 3) != 0.9: r - mean = 6e-8, and std-scaling blows that residue up to
    # ~0.056 (std is ~1e-7, not 0). Constant groups must come out as exact zeros anyway.
    r = torch.tensor([0.9, 0.9, 0.9, 0.7, 0.7, 0.7])
    assert (r[:3] - r[:3].mean() != 0).any()  # the float32 residue this test is about is really there
    for scale in (True, False):
        a = grpo_advantages(r, 3, scale_by_std=scale)
        assert torch.equal(a, torch.zeros(6))
        assert torch.equal(zero_advantage_groups(a, 3), torch.tensor([True, True]))


def test_grpo_advantages_group_size_one_and_bad_n():
    a = grpo_advantages(torch.tensor([1.0, 0.0, 3.0]), 1)
    assert torch.equal(a, torch.zeros(3)) and not torch.isnan(a).any()
    with pytest.raises(ValueError):
        grpo_advantages(torch.tensor([1.0, 0.0, 1.0]), 2)
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(8), 0)


def test_grpo_advantages_integer_rewards_and_std_dr_grpo_group():
    # group [2, 0, 1]: mean 1 -> [1, -1, 0]; unbiased std = sqrt((1+1+0)/2) = 1 -> 1 / (1 + 1e-6)
    a = grpo_advantages(torch.tensor([2, 0, 1]), 3)
    assert a.dtype == torch.float32
    assert torch.allclose(a, torch.tensor([1.0, -1.0, 0.0]) / (1 + 1e-6), atol=1e-7)


def test_zero_advantage_groups():
    a = torch.tensor([0.0, 0.0, 0.5, -0.5, 1e-9, -1e-9, 0.0, 1e-3])
    assert torch.equal(zero_advantage_groups(a, 2), torch.tensor([True, False, True, False]))
    assert torch.equal(zero_advantage_groups(a, 4), torch.tensor([False, False]))
    with pytest.raises(ValueError):
        zero_advantage_groups(a, 3)


# ------------------------------------------------------------------------------- per-token quantities
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_log_softmax(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 3
    tokens = torch.randint(0, 50, (3, 5), generator=g)
    ref = torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    out = token_logprobs(logits, tokens, temperature)
    assert out.shape == (3, 5)
    assert torch.allclose(out, ref, atol=1e-5)


def test_token_logprobs_hand_value_and_grad():
    # logits [0, ln 3] -> p = [1/4, 3/4]; log p(token 1) = ln 0.75
    logits = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True)
    out = token_logprobs(logits, torch.tensor([[1]]))
    assert abs(out.item() - math.log(0.75)) < 1e-6
    out.sum().backward()
    # d log p_1 / d z = onehot(1) - p = [-0.25, 0.25]
    assert torch.allclose(logits.grad, torch.tensor([[[-0.25, 0.25]]]), atol=1e-6)


def test_token_logprobs_shape_mismatch():
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_entropy_uniform_onehot_and_reference():
    V = 32
    # uniform over V -> H = log V = 3.4657359
    assert torch.allclose(entropy_from_logits(torch.zeros(2, 3, V)), torch.full((2, 3), math.log(V)))
    # one logit 100 above the rest: p_other ~ e^-100, H ~ 0
    peaked = torch.zeros(1, 1, V)
    peaked[..., 5] = 100.0
    assert entropy_from_logits(peaked).item() < 1e-6
    # generic case vs. -sum p log p at temperature 0.7
    logits = torch.randn(2, 4, V, generator=torch.Generator().manual_seed(1)) * 2
    lp = torch.log_softmax(logits / 0.7, -1)
    assert torch.allclose(entropy_from_logits(logits, 0.7), -(lp.exp() * lp).sum(-1), atol=1e-5)


def test_entropy_two_way_hand_value():
    # p = [1/4, 3/4] -> H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616 = 0.5623351
    h = entropy_from_logits(torch.tensor([[[0.0, math.log(3.0)]]]))
    assert abs(h.item() - 0.5623351) < 1e-6
    # temperature 2 on logits [0, 2 ln 3] gives the same distribution
    h2 = entropy_from_logits(torch.tensor([[[0.0, 2 * math.log(3.0)]]]), temperature=2.0)
    assert abs(h2.item() - 0.5623351) < 1e-6


# ---------------------------------------------------------------------------------------------- k3
def test_k3_kl():
    lp = torch.tensor([math.log(0.5), -1.3])
    assert torch.equal(k3_kl(lp, lp), torch.zeros(2))
    # pi = 0.5, pi_ref = 0.25: d = ln(0.25/0.5) = -0.6931472; exp(d) - d - 1 = 0.5 + 0.6931472 - 1
    v = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert abs(v.item() - 0.1931472) < 1e-6
    # reversed: d = +ln 2 -> 2 - 0.6931472 - 1 = 0.3068528 (k3 is not symmetric)
    v = k3_kl(torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)]))
    assert abs(v.item() - 0.3068528) < 1e-6
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1000, generator=g) * 5, torch.randn(1000, generator=g) * 5
    assert (k3_kl(a, b) >= 0).all()
    # log-ratio 100 is clamped to 20: exp(20) - 20 - 1, finite
    big = k3_kl(torch.tensor([0.0]), torch.tensor([100.0]))
    assert torch.isfinite(big).all() and abs(big.item() / (math.exp(20) - 21) - 1) < 1e-6


# -------------------------------------------------------------------------------------- policy loss
def _hand_batch():
    """Two sequences, T = 3, clip_low 0.2 / clip_high 0.28 (clip range [0.8, 1.28]).

    seq 0: A = +1, rho = [1.0, 1.1, 1.5], mask [1, 1, 1]
        l = -min(rho, clip(rho)) = [-1.0, -1.1, -1.28]   (1.5 clipped to 1.28: clip active)  sum -3.38
    seq 1: A = -2, rho = [0.5, 1.0, pad], mask [1, 1, 0]
        token 0: rho A = -1.0, clip(0.5) A = 0.8 * -2 = -1.6, min = -1.6 -> l = 1.6  (clip active)
        token 1: l = 2.0                                                               sum 3.6
    the padding position holds logp 50 vs old -50 (exp(100) = inf if it were not masked out)
    """
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.5, -50.0]])
    log_rho = torch.tensor([[0.0, math.log(1.1), math.log(1.5)], [math.log(0.5), 0.0, 100.0]])
    logprobs = (old + log_rho).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logprobs, old, adv, mask


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", 0.22 / 5),                                # (-3.38 + 3.6) / 5 tokens = 0.044
    ("seq-mean-token-mean", (-3.38 / 3 + 3.6 / 2) / 2),      # (-1.1266667 + 1.8) / 2 = 0.3366667
    ("seq-mean-token-sum-norm", 0.22 / (2 * 4)),             # 0.22 / (2 seqs * max_len 4) = 0.0275
])
def test_policy_loss_hand_values(mode, expected):
    logprobs, old, adv, mask = _hand_batch()
    loss, st = policy_loss(logprobs, old, adv, mask, loss_agg=mode, num_tokens=5, num_seqs=2, max_len=4)
    assert abs(loss.item() - expected) < 1e-6
    assert st["clipped_tokens"].item() == 2
    assert abs(st["ratio_sum"].item() - 5.1) < 1e-5           # 1 + 1.1 + 1.5 + 0.5 + 1
    assert st["tokens"].item() == 5 and st["kl_sum"].item() == 0.0
    assert all(not v.requires_grad for v in st.values())
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    g = logprobs.grad
    # clipped tokens (seq 0 token 2, seq 1 token 0) and padding get no gradient
    assert g[0, 2] == 0 and g[1, 0] == 0 and g[1, 2] == 0
    if mode == "token-mean":
        # dl/dlogp = -A rho / num_tokens: seq0 tok1 -1.1/5 = -0.22; seq1 tok1 +2/5 = 0.4
        assert abs(g[0, 1].item() + 0.22) < 1e-6 and abs(g[1, 1].item() - 0.4) < 1e-6
    if mode == "seq-mean-token-mean":
        # seq0 tok0: -1 / 3 / 2 = -0.1666667; seq1 tok1: 2 / 2 / 2 = 0.5
        assert abs(g[0, 0].item() + 1 / 6) < 1e-6 and abs(g[1, 1].item() - 0.5) < 1e-6


def test_policy_loss_with_kl_hand_value():
    logprobs, old, adv, mask = _hand_batch()
    # ref differs from logprobs only at seq 0 token 0: pi = e^-1, ref = e^-1 / 2 -> k3 = 0.1931472
    ref = logprobs.detach().clone()
    ref[0, 0] += math.log(0.5)
    ref[1, 2] = -1000.0  # padding: must not count
    loss, st = policy_loss(logprobs, old, adv, mask, num_tokens=5, num_seqs=2, kl_coef=0.1, ref_logprobs=ref)
    # token-mean: (0.22 + 0.1 * 0.1931472) / 5 = 0.0478629
    assert abs(loss.item() - 0.0478629) < 1e-6
    assert abs(st["kl_sum"].item() - 0.1931472) < 1e-6
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp) = 1 - 0.5 = 0.5; grad seq0 tok0 = (-1 + 0.1 * 0.5) / 5 = -0.19
    assert abs(logprobs.grad[0, 0].item() + 0.19) < 1e-6
    # kl stats are reported even with kl_coef = 0 (monitoring the drift without penalising it)
    _, st0 = policy_loss(logprobs, old, adv, mask, num_tokens=5, num_seqs=2, ref_logprobs=ref)
    assert abs(st0["kl_sum"].item() - 0.1931472) < 1e-6


def _one_token(log_rho, adv, **kw):
    old = torch.tensor([[-1.0]])
    lp = (old + math.log(log_rho)).requires_grad_(True)
    loss, st = policy_loss(lp, old, torch.tensor([adv]), torch.ones(1, 1), num_tokens=1, num_seqs=1, **kw)
    loss.backward()
    return loss.item(), lp.grad.item(), st["clipped_tokens"].item()


def test_clipping_positive_advantage_above_range():
    # A = 2, rho = 1.5 > 1.28: loss = -1.28 * 2 = -2.56, constant in logp -> grad 0, counted
    loss, grad, n = _one_token(1.5, 2.0)
    assert abs(loss + 2.56) < 1e-6 and grad == 0.0 and n == 1
    # A = 2, rho = 0.5 < 0.8: pessimistic min keeps rho A = 1 -> loss -1, grad -A rho = -1, not counted
    loss, grad, n = _one_token(0.5, 2.0)
    assert abs(loss + 1.0) < 1e-6 and abs(grad + 1.0) < 1e-6 and n == 0


def test_clipping_negative_advantage_below_range():
    # A = -1, rho = 0.5 < 0.8: min(-0.5, -0.8) = -0.8 -> loss 0.8, grad 0, counted
    loss, grad, n = _one_token(0.5, -1.0)
    assert abs(loss - 0.8) < 1e-6 and grad == 0.0 and n == 1
    # A = -1, rho = 2 > 1.28: min(-2, -1.28) = -2 -> loss 2, grad -A rho = 2, not counted
    loss, grad, n = _one_token(2.0, -1.0)
    assert abs(loss - 2.0) < 1e-6 and abs(grad - 2.0) < 1e-6 and n == 0


def test_clip_higher_asymmetry():
    # same distance 0.25 from 1: above (1.25 < 1.28) is still inside, below (0.75 < 0.8) is clipped
    loss, grad, n = _one_token(1.25, 1.0)
    assert abs(loss + 1.25) < 1e-6 and abs(grad + 1.25) < 1e-6 and n == 0
    loss, grad, n = _one_token(0.75, -1.0)
    assert abs(loss - 0.8) < 1e-6 and grad == 0.0 and n == 1
    # with symmetric clipping (0.2 / 0.2) the upper one is clipped too: loss -1.2, grad 0
    loss, grad, n = _one_token(1.25, 1.0, clip_high=0.2)
    assert abs(loss + 1.2) < 1e-6 and grad == 0.0 and n == 1


def test_on_policy_is_reinforce():
    # old = logprobs.detach(): rho == 1 in value, grad = -A * mask / num_tokens
    lp = torch.randn(2, 4, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    adv = torch.tensor([0.5, -1.5])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    loss, st = policy_loss(lp, lp.detach(), adv, mask, num_tokens=5, num_seqs=2)
    # value: (3 * -0.5 + 2 * 1.5) / 5 = 0.3
    assert abs(loss.item() - 0.3) < 1e-6 and st["clipped_tokens"].item() == 0
    loss.backward()
    assert torch.allclose(lp.grad, -adv[:, None] * mask / 5, atol=1e-7)


def test_policy_loss_errors():
    lp, old, adv, mask = _hand_batch()
    with pytest.raises(ValueError, match="token-mean"):  # message lists the known modes
        policy_loss(lp, old, adv, mask, loss_agg="sum", num_tokens=5, num_seqs=2)
    with pytest.raises(ValueError, match="max_len"):
        policy_loss(lp, old, adv, mask, loss_agg="seq-mean-token-sum-norm", num_tokens=5, num_seqs=2)
    with pytest.raises(ValueError):
        policy_loss(lp, old, adv, mask, num_tokens=5, num_seqs=2, kl_coef=0.1)


def test_empty_mask_gives_zero_not_nan():
    lp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = policy_loss(lp, lp.detach(), torch.ones(1), torch.zeros(1, 3), num_tokens=0, num_seqs=1)
    assert loss.item() == 0.0


# --------------------------------------------------------------------------------------- invariance
def _random_batch(seed=4, B=8, T=12):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, 12, 5, 3, 9, 7, 2, 11])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    # log-ratios up to +-0.5 so that both clip sides are active on some tokens
    logprobs = old + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    ref = old + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.4
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logprobs, old, ref, adv, mask


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_microbatch_split_invariance(mode, kl_coef):
    base, old, ref, adv, mask = _random_batch()
    kw = dict(loss_agg=mode, num_tokens=int(mask.sum()), num_seqs=8, max_len=12, kl_coef=kl_coef,
              ref_logprobs=ref if kl_coef else None)

    full_lp = base.clone().requires_grad_(True)
    full_loss, full_st = policy_loss(full_lp, old, adv, mask, **{**kw, "ref_logprobs": ref})
    full_loss.backward()
    assert full_st["clipped_tokens"] > 0  # the batch exercises the clip
    assert full_lp.grad.abs().sum() > 0

    for sizes in ([3, 5], [1, 1, 2, 4]):
        lp = base.clone().requires_grad_(True)
        total, sums, start = 0.0, {}, 0
        for n in sizes:
            sl = slice(start, start + n)
            start += n
            loss, st = policy_loss(lp[sl], old[sl], adv[sl], mask[sl],
                                   **{**kw, "ref_logprobs": ref[sl]})
            loss.backward()  # gradients accumulate in lp.grad, as in grad accumulation
            total += loss.item()
            for k, v in st.items():
                sums[k] = sums.get(k, 0.0) + v.item()
        assert abs(total - full_loss.item()) < 1e-6, (mode, sizes)
        assert torch.allclose(lp.grad, full_lp.grad, atol=1e-6, rtol=0), (mode, sizes)
        for k, v in full_st.items():
            assert abs(sums[k] - v.item()) < 1e-6, (k, sizes)
