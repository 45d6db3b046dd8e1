"""GDRO on hand-made pass rates: debiased pass rates, the bins' bandit, the square-root allocation, variable-size
group advantages and whole-group splitting."""
import itertools
import json
import math

import pytest
import torch

from rl.algo.core import fgo_advantages, fgo_rewards, grpo_advantages
from rl.algo.core import fgo_weight_spread as fixed_weight_spread
from rl.algo.gdro import (BinBandit, DebiasedEma, GdroSampler, GdroState, bernoulli_variance, difficulty_bin,
                     sqrt_allocation)
from rl.algo.advantages import fgo_weight_spread, per_group, zero_groups
from rl.algo.groups import group_index, worker_bounds


# Variable-size groups through the estimators' index grouping (rl/algo/advantages.py), in the sizes' terms.
def grpo_advantages_grouped(r, sizes, scale_by_std=True):
    return per_group(lambda x, G: grpo_advantages(x, G, scale_by_std=scale_by_std),
                     torch.tensor(group_index(sizes)), r)


def fgo_advantages_grouped(ok, L, H, sizes, alpha, beta, scale_by_std=False):
    return per_group(lambda *c: fgo_advantages(*c, alpha, beta, scale_by_std=scale_by_std),
                     torch.tensor(group_index(sizes)), ok, L, H)


def fgo_weight_spread_grouped(R, ok, sizes):
    return fgo_weight_spread(R, ok, torch.tensor(group_index(sizes)))


def zero_advantage_groups_grouped(adv, sizes):
    return zero_groups(adv, torch.tensor(group_index(sizes)))


def test_debiased_pass_rate_like_adams_bias_correction():
    ema = DebiasedEma(0.5)
    assert ema.get("a") is None
    ema.update("a", 0.75)
    assert ema.get("a") == 0.75  # one observation is taken as it is, not shrunk towards 0
    ema.update("a", 0.25)
    assert ema.get("a") == pytest.approx((0.5 * 0.5 * 0.75 + 0.5 * 0.25) / (1 - 0.5 ** 2))
    back = DebiasedEma(0.9)
    back.load_state_dict(json.loads(json.dumps(ema.state_dict())))
    assert back.get("a") == ema.get("a") and back.beta == 0.5


def test_difficulty_bins_and_variance_estimate():
    assert [difficulty_bin(p, 5) for p in (0.0, 0.19, 0.2, 0.5, 0.99, 1.0, None)] == [0, 0, 1, 2, 4, 4, 5]
    assert bernoulli_variance(0.5, 4) == pytest.approx(0.25 * 4 / 3)  # p^(1-p^) is low by (n-1)/n
    assert bernoulli_variance(1.0, 8) == 0.0 and bernoulli_variance(1.0, 1) is None


def test_bandit_reweights_bins_by_exponentiated_gradient():
    b = BinBandit(3, eta=2.0, exploration=0.0, score_beta=0.5)
    assert b.weights() == pytest.approx([1 / 3] * 3)
    b.update({0: [0.25, 0.15], 1: [0.0]})  # arm 0's gain 0.2, arm 1's 0, arm 2 unseen: the best known gain
    z = [math.exp(2 * 0.2), math.exp(0.0), math.exp(2 * 0.2)]
    assert b.weights() == pytest.approx([x / sum(z) for x in z])
    b.update({1: [0.25]})  # arm 1's debiased EMA: (0.5 * 0 + 0.5 * 0.25) / (1 - 0.25) = 1/6
    g1 = 0.5 * 0.25 / 0.75
    z = [math.exp(2 * 0.4), math.exp(2 * g1), math.exp(2 * 0.4)]
    assert b.gain(1) == pytest.approx(g1) and b.weights() == pytest.approx([x / sum(z) for x in z])
    # Exploration mixes in a uniform share over the arms that still hold prompts; an empty arm gets nothing.
    b.exploration = 0.3
    q = b.weights()
    p = b.probabilities([True, False, True])
    assert p[1] == 0 and sum(p) == pytest.approx(1)
    assert p[0] == pytest.approx(0.7 * q[0] / (q[0] + q[2]) + 0.15)


def test_frontier_bins_gain_weight_over_solved_and_hopeless_ones():
    """The bins' gain is p(1-p) of their groups: over steps the bandit moves to the p ~ 0.5 bin."""
    state = GdroState(bins=5, eta=5.0, exploration=0.0)
    rows = [{"id": f"q{i}"} for i in range(30)]
    truth = {f"q{i}": (0.0, 0.5, 1.0)[i % 3] for i in range(30)}  # hopeless, frontier, solved
    sampler = GdroSampler(rows, seed=0, state=state)
    for _ in range(12):
        drawn = sampler.next_batch(6)
        state.observe([(r["id"], 8, truth[r["id"]], arm) for r, arm in zip(drawn, sampler.last_arms)],
                      [r["id"] for r in rows])
    q = state.bandit.weights()
    assert q[2] > 0.9 and q[2] == max(q)  # the bin of p = 0.5
    assert q[1] == q[3] < 0.01  # never held a prompt: no weight piled up
    drawn = sampler.next_batch(6)
    assert sum(truth[r["id"]] == 0.5 for r in drawn) >= 5
    assert len({r["id"] for r in drawn}) == 6  # a prompt at most once per batch
    hist = state.histogram([r["id"] for r in rows])  # bins 0, 2, 4 as observed, the rest never drawn
    assert sum(hist) == 30 and hist[1] == hist[3] == 0 and hist[2] >= 5


def test_gdro_sampler_resumes_exactly():
    rows = [{"id": f"q{i}", "prompt": str(i)} for i in range(20)]

    def feedback(state, sampler, drawn):
        state.observe([(r["id"], 4, (int(r["id"][1:]) % 5) / 4, a) for r, a in zip(drawn, sampler.last_arms)],
                      [r["id"] for r in rows])

    state = GdroState(bins=4)
    sampler = GdroSampler(rows, seed=3, state=state)
    feedback(state, sampler, sampler.next_batch(5))
    saved = json.loads(json.dumps({"sampler": sampler.state_dict(), "step": state.state_dict()}))  # checkpoint
    expected = []
    for _ in range(3):
        drawn = sampler.next_batch(5)
        feedback(state, sampler, drawn)
        expected.append([r["id"] for r in drawn])

    state2 = GdroState(bins=4)
    sampler2 = GdroSampler(rows, seed=3, state=state2)
    sampler2.load_state_dict(saved["sampler"])
    state2.load_state_dict(saved["step"])
    got = []
    for _ in range(3):
        drawn = sampler2.next_batch(5)
        feedback(state2, sampler2, drawn)
        got.append([r["id"] for r in drawn])
    assert got == expected and state2.state_dict() == state.state_dict()
    with pytest.raises(ValueError, match="bins"):
        GdroState(bins=5).load_state_dict(saved["step"])
    with pytest.raises(ValueError, match="uniform"):
        sampler2.load_state_dict({"epoch": 0, "position": 3, "num_rows": 20})


# ------------------------------------------------------------------------------------------ square-root rule
def _proxy(sizes, var):
    return sum(v / n for v, n in zip(var, sizes))


def test_sqrt_allocation_by_hand():
    # sigma^2 = [0.25, 0]: every extra sample goes to the uncertain prompt, up to its cap.
    assert sqrt_allocation([0.5, 0.0], 8, min_size=2, floor=0.0) == [6, 2]
    assert sqrt_allocation([0.5, 0.0], 8, min_size=2, max_size=5, floor=0.0) == [5, 3]
    # sigma = [0.5, 0.3]: the square-root rule gives 10 * [0.625, 0.375] = [6.25, 3.75] -> [6, 4].
    assert sqrt_allocation([0.5, 0.1], 10, floor=0.0) == [6, 4]
    # Equal pass rates keep the fixed size; unseen prompts count as 0.5.
    assert sqrt_allocation([0.3] * 4, 16) == [4] * 4
    assert sqrt_allocation([None, 0.5], 8) == [4, 4]
    with pytest.raises(ValueError):
        sqrt_allocation([0.5, 0.5], 3, min_size=2)


@pytest.mark.parametrize("seed", range(6))
def test_sqrt_allocation_keeps_the_budget_and_is_the_integer_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    P, G = 4, 4
    rates = [float(x) for x in torch.rand(P, generator=g)]
    rates[seed % P] = None if seed % 2 else 1.0
    sizes = sqrt_allocation(rates, P * G, min_size=2, max_size=8, floor=0.05)
    assert sum(sizes) == P * G and all(2 <= n <= 8 for n in sizes)  # the mean budget, exactly
    var = [(lambda q: q * (1 - q))(min(0.95, max(0.05, 0.5 if p is None else p))) for p in rates]
    best = min(_proxy(c, var) for c in itertools.product(range(2, 9), repeat=P) if sum(c) == P * G)
    assert _proxy(sizes, var) == pytest.approx(best, abs=1e-12)
    # ...and it follows the square-root rule: a more uncertain prompt never gets fewer samples.
    order = sorted(range(P), key=lambda i: var[i])
    assert [sizes[i] for i in order] == sorted(sizes)


# ------------------------------------------------------------------------------------ variable-size groups
def test_grouped_grpo_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 1.0])
    sizes = [2, 3, 4]
    adv = grpo_advantages_grouped(r, sizes, scale_by_std=True)
    assert adv[:2].tolist() == pytest.approx([0.5 / (0.5 ** 0.5 + 1e-6), -0.5 / (0.5 ** 0.5 + 1e-6)], rel=1e-6)
    assert adv[2:5].tolist() == [0.0, 0.0, 0.0]  # a constant group: exact zeros
    g = torch.tensor([2.0, 0.0, 1.0, 1.0])
    assert adv[5:].tolist() == pytest.approx(((g - 1.0) / (g.std() + 1e-6)).tolist(), rel=1e-6)
    dr = grpo_advantages_grouped(r, sizes, scale_by_std=False)
    assert dr[5:].tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])
    assert zero_advantage_groups_grouped(adv, sizes).tolist() == [False, True, False]
    assert grpo_advantages_grouped(r[:1], [1]).tolist() == [0.0]  # no baseline from one sample
    assert group_index(sizes) == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    with pytest.raises(ValueError):
        grpo_advantages_grouped(r, [2, 3])


def test_grouped_advantages_equal_the_fixed_size_functions():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(12, generator=g)
    assert torch.equal(grpo_advantages_grouped(r, [4, 4, 4]), grpo_advantages(r, 4))
    ok, L, H = torch.rand(12, generator=g) > 0.5, torch.randint(5, 40, (12,), generator=g).double(), \
        torch.rand(12, generator=g).double() + 0.1
    assert torch.equal(fgo_advantages_grouped(ok, L, H, [3] * 4, 0.5, 1.0), fgo_advantages(ok, L, H, 3, 0.5, 1.0))
    R = fgo_rewards(ok, L, H, 3, 0.5, 1.0)
    assert fgo_weight_spread_grouped(R, ok, [3] * 4) == pytest.approx(fixed_weight_spread(R, ok, 3), abs=1e-15)
    sizes = [5, 2, 5]
    got = fgo_advantages_grouped(ok, L, H, sizes, 0.5, 1.0, scale_by_std=True)
    want = torch.cat([fgo_advantages(ok[a:b], L[a:b], H[a:b], b - a, 0.5, 1.0, scale_by_std=True)
                      for a, b in ((0, 5), (5, 7), (7, 12))])
    assert torch.equal(got, want)


def test_groups_are_never_split_across_reward_workers():
    assert worker_bounds([3, 2, 5, 2], 2) == [(0, 5), (5, 12)]
    assert worker_bounds([3, 2], 3) == [(0, 3), (3, 5), (5, 5)]
    from rl.contracts import RolloutBatch
    from rl.scoring.score import reward_columns

    batch = RolloutBatch([[1]] * 5, [[2], [3], [4], [5], [6]], [[0.0]] * 5, [0.0] * 5, ["stop"] * 5, list("abcde"))
    cols = reward_columns([{"id": "x", "answer": "1"}, {"id": "y", "answer": "2"}], batch, [3, 2])
    assert cols["group_id"] == [0, 0, 0, 1, 1] and cols["answer"] == ["1", "1", "1", "2", "2"]
    assert cols["id"] == ["x", "x", "x", "y", "y"]
