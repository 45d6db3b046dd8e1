"""FGO (docs/algorithms.md, "FGO") against hand-computed groups, and its two entropy proxies. Pure torch, fast."""
import math

import pytest
import torch

from rl.algo.core import (
    entropy_from_logits,
    fgo_advantages,
    fgo_rewards,
    fgo_weight_spread,
    grpo_advantages,
    mean_token_entropy,
    sampled_token_entropy,
    token_logprobs,
    zero_advantage_groups,
)


def softmax(xs):
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


def T(xs, dtype=torch.float64):
    return torch.tensor(xs, dtype=dtype)


# ------------------------------------------------------------------------------------ hand-computed groups
def test_mixed_group_weights_by_hand_and_mean_zero():
    # 2 correct (L 10, 30; H 2, 2) and 2 wrong (L 20, 40; H 1, 3), alpha 1, beta 1 to make the numbers readable.
    c, L, H = T([1, 1, 0, 0]), T([10, 30, 20, 40]), T([2, 2, 1, 3])
    # correct: mean L 20, mean H 2 -> x = (20/10)*(2/2) = 2, (20/30)*1 = 2/3
    # wrong:   mean L 30, mean H 2 -> x = (20/30)*(2/1) = 4/3, (40/30)*(2/3) = 8/9
    w_ok, w_bad = softmax([2, 2 / 3]), softmax([4 / 3, 8 / 9])
    R = fgo_rewards(c, L, H, 4, alpha=1.0, beta=1.0)
    expected = [w_ok[0], w_ok[1], -w_bad[0], -w_bad[1]]
    assert R.tolist() == pytest.approx(expected, rel=1e-5)
    A = fgo_advantages(c, L, H, 4, alpha=1.0, beta=1.0)
    # mixed group: each subgroup's weights sum to +-1, so mean R = 0 and A = R
    assert float(R.sum()) == pytest.approx(0.0, abs=1e-12)
    assert A.tolist() == pytest.approx(expected, rel=1e-5)
    # shorter correct answer gets more credit; among wrong ones the lower-entropy one is penalised most
    assert A[0] > A[1] > 0 > A[3] > A[2]


def test_all_correct_group_is_not_wasted():
    c, L, H = T([1, 1, 1]), T([10, 20, 40]), T([1, 1, 1])
    # alpha 0.01 (the default): x_i = (70/3 / L_i)^0.01, W = softmax(x), R = W, mean R = 1/3
    x = [((70 / 3) / n) ** 0.01 for n in (10, 20, 40)]
    W = softmax(x)
    A = fgo_advantages(c, L, H, 3)
    assert A.tolist() == pytest.approx([w - 1 / 3 for w in W], rel=1e-4)
    assert A[0] > 0 > A[2]  # the shortest correct answer is favoured
    assert not zero_advantage_groups(A, 3).any()
    assert zero_advantage_groups(grpo_advantages(c.float(), 3), 3).all()  # GRPO drops this group


def test_all_wrong_group_rewards_short_high_entropy_mistakes():
    c, L, H = T([0, 0]), T([10, 30]), T([2, 2])
    # wrong: x = (L / 20)^alpha * 1 -> alpha 1: 0.5, 1.5; R = -softmax; A = 1/G - W
    W = softmax([0.5, 1.5])
    A = fgo_advantages(c, L, H, 2, alpha=1.0)
    assert A.tolist() == pytest.approx([0.5 - W[0], 0.5 - W[1]], rel=1e-5)
    assert A[0] > 0 > A[1]  # the short wrong answer is penalised least
    # ... and with equal lengths, the higher-entropy (more exploratory) mistake is penalised least
    A = fgo_advantages(c, T([20, 20]), T([1, 4]), 2)
    assert A[1] > 0 > A[0]


def test_singleton_subgroup_is_plus_minus_one():
    c, L, H = T([1, 0, 0, 0]), T([50, 10, 20, 30]), T([5, 1, 1, 1])
    R = fgo_rewards(c, L, H, 4)
    assert R[0].item() == pytest.approx(1.0)  # W = 1 whatever its length or entropy
    assert float(R[1:].sum()) == pytest.approx(-1.0)
    # group of one: no baseline, no signal
    assert fgo_advantages(T([1]), T([3]), T([1]), 1).tolist() == [0.0]


def test_ties_in_length_leave_only_the_entropy_term():
    c, L, H = T([1, 1, 0, 0]), T([16, 16, 16, 16]), T([1, 3, 1, 3])
    R = fgo_rewards(c, L, H, 4, alpha=5.0)  # any alpha: every length factor is exactly 1
    # correct: x = 2/1, 2/3; wrong: the same ratios
    assert R.tolist() == pytest.approx(softmax([2, 2 / 3]) + [-w for w in softmax([2, 2 / 3])], rel=1e-5)
    # identical members (same length and entropy) -> uniform weights -> an exact zero-advantage group
    A = fgo_advantages(T([1, 1, 1, 1]), T([8, 8, 8, 8]), T([2, 2, 2, 2]), 4)
    assert torch.equal(A, torch.zeros(4)) and zero_advantage_groups(A, 4).all()


def test_std_scaling_is_the_released_code_form():
    c, L, H = T([1, 1, 1]), T([10, 20, 40]), T([1, 1, 1])
    R = fgo_rewards(c, L, H, 3)
    centred = R - R.mean()
    expected = centred / (R.std() + 1e-4)  # unbiased std + 1e-4 (TRL 0.16)
    assert fgo_advantages(c, L, H, 3, scale_by_std=True).tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    # tiny weight differences are blown up to unit scale: the released code's large effect on uniform groups
    assert fgo_advantages(c, L, H, 3, scale_by_std=True).abs().max() > 0.5 > fgo_advantages(c, L, H, 3).abs().max()


def test_groups_are_independent_and_contiguous():
    c, L, H = T([1, 0, 1, 1]), T([10, 20, 10, 30]), T([1, 1, 1, 1])
    both = fgo_advantages(c, L, H, 2)
    assert both[:2].tolist() == fgo_advantages(c[:2], L[:2], H[:2], 2).tolist()
    assert both[2:].tolist() == fgo_advantages(c[2:], L[2:], H[2:], 2).tolist()
    with pytest.raises(ValueError):
        fgo_advantages(c, L, H, 3)


def test_weight_spread():
    c = T([1, 1, 0, 0])
    assert fgo_weight_spread(T([0.5, 0.5, -0.5, -0.5]), c, 4) == 0.0  # uniform
    # correct: (0.75 - 0.25) * 2 = 1.0; wrong: uniform 0 -> mean 0.5
    assert fgo_weight_spread(T([0.75, 0.25, -0.5, -0.5]), c, 4) == pytest.approx(0.5)
    assert fgo_weight_spread(T([1.0, -1.0]), T([1, 0]), 2) == 0.0  # singletons have no spread


# -------------------------------------------------------------------------------------------- entropies
def test_entropy_definitions_on_a_known_distribution():
    V = 8
    # Response 1: two steps of a uniform distribution over 8 tokens; response 2: one step of p = (1/2, 1/2, 0, ...)
    # (the other 6 logits at -inf are approximated by -1e9).
    uniform = torch.zeros(2, V)
    half = torch.full((2, V), -1e9)
    half[:, :2] = 0.0
    logits = torch.stack([uniform, half])  # [B=2, T=2, V]
    tokens = torch.tensor([[3, 5], [1, 0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # response 2 has one token
    lp = token_logprobs(logits, tokens)
    # sampled token: -p log p = (1/8) log 8 per uniform step; (1/2) log 2 for the half step; summed over the response
    expected_sampled = [2 * (1 / 8) * math.log(8), 0.5 * math.log(2)]
    assert sampled_token_entropy(lp, mask).tolist() == pytest.approx(expected_sampled, rel=1e-5)
    # full vocabulary: log 8 per uniform step, log 2 for the half step; averaged over the response's tokens
    ent = entropy_from_logits(logits)
    assert mean_token_entropy(ent, mask).tolist() == pytest.approx([math.log(8), math.log(2)], rel=1e-5)
    # the sampled-token proxy grows with length, the mean does not (why the spec calls it an ablation)
    assert sampled_token_entropy(lp[:1, :1], mask[:1, :1]) < sampled_token_entropy(lp[:1], mask[:1])


def test_correct_only_weighting_leaves_wrong_answers_equal_and_the_correct_ones_as_published():
    """fgo.weighted_subgroups: correct — the incorrect subgroup's rewards become -1/n whatever their lengths and
    entropies (no push toward longer wrong answers); the correct subgroup's are the published ones."""
    import torch

    correct = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0])
    lengths = torch.tensor([50., 80., 120., 40., 90., 150., 60., 200.])
    entropies = lengths * 0.1  # the summed proxy grows with length
    both = fgo_rewards(correct, lengths, entropies, 8)
    only = fgo_rewards(correct, lengths, entropies, 8, uniform_wrong=True)
    assert torch.equal(only[:3], both[:3]) and only[0] > only[1] > only[2] > 0
    assert torch.allclose(only[3:], torch.full((5,), -0.2, dtype=only.dtype))
    # Published: the longest wrong answer gets the least negative reward (the lengthening push).
    assert both[3:].argmax() == 4 and not torch.allclose(both[3:], only[3:])
    adv = fgo_advantages(correct, lengths, entropies, 8, scale_by_std=True, uniform_wrong=True)
    assert torch.allclose(adv[3:], adv[3:].mean().expand(5)) and adv[0] > adv[1] > adv[2]
    # An all-wrong group then carries no signal at all, as under GRPO.
    assert torch.equal(fgo_advantages(torch.zeros(8), lengths, entropies, 8, scale_by_std=True, uniform_wrong=True),
                       torch.zeros(8))
