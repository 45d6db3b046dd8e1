"""The advantage-estimator registry (rl/algo/advantages.py): the same numbers as the fixed-size functions it replaced,
bit for bit, on fixed and variable groups; and a new estimator is one function plus one registration."""
import random

import pytest
import torch

from rewards.isolation import RewardResult
from rl.algo.advantages import ADVANTAGES, per_group, register_advantage
from rl.algo.core import (fgo_advantages, fgo_rewards, fgo_weight_spread, grpo_advantages, sampled_token_entropy,
                          zero_advantage_groups)
from rl.config.base import ConfigError
from rl.config.schema import load_config
from rl.contracts import RolloutBatch
from rl.learner.batch import pad_values
from rl.scoring.score import ScoredBatch
from rl.steps import make_step
from rl.steps.policy import advantages as step_advantages
from rl.steps.samples import StepSamples


def advantages(cfg, scored, batch, sizes):
    """The policy step's estimator on records built from (scored, batch); each record gets its advantage."""
    samples = StepSamples.build([{"id": f"q{g}"} for g in range(len(sizes))], sizes, batch)
    samples.add_scores(scored)
    adv, stats = step_advantages(cfg, samples)
    assert [s.advantage for s in samples.samples] == adv.tolist()
    return adv, stats


def _random_step(sizes, seed):
    rng = random.Random(seed)
    batch, total, correct = RolloutBatch(), [], []
    for n in sizes:
        for _ in range(n):
            k = rng.randint(1, 12)
            batch.append([1, 2], [3] * k, [-rng.random() * 3 for _ in range(k)], rng.random() * k, "stop", "x")
            correct.append(float(rng.random() < 0.5))
            total.append(rng.choice([0.0, 1.0, 0.25, rng.random()]))
    return ScoredBatch(total, correct, RewardResult()), batch


def _old_fixed(cfg, scored, batch, G):
    """The policy step's advantages before the registry (fixed group size G), kept here as the reference."""
    a = cfg.algorithm
    if a.name == "grpo":
        adv, stats = grpo_advantages(torch.tensor(scored.total), G, scale_by_std=a.scale_by_std), {}
    else:
        ok = torch.tensor(scored.correct) > 0.5
        lengths = torch.tensor(batch.tokens, dtype=torch.float64)
        H = _old_entropies(batch, a.fgo.entropy)
        adv = fgo_advantages(ok, lengths, H, G, a.fgo.alpha, a.fgo.beta, scale_by_std=a.scale_by_std)
        w = fgo_rewards(ok, lengths, H, G, a.fgo.alpha, a.fgo.beta)
        grpo_zero = zero_advantage_groups(grpo_advantages(ok.float(), G), G).float().mean()
        stats = {"fgo_entropy": float(H.mean()), "fgo_weight_spread": fgo_weight_spread(w, ok, G),
                 "zero_adv_groups_grpo": float(grpo_zero)}
    stats["zero_adv_groups"] = float(zero_advantage_groups(adv, G).float().mean())
    return adv, stats


def _old_variable(cfg, scored, batch, sizes):
    """...and for variable groups (the removed *_grouped functions of rl/algo/groups.py): each group alone."""
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n

    def cat(fn, *cols):
        return torch.cat([fn(*(c[s:e] for c in cols), e - s) for s, e in bounds])

    def zero(adv):
        return float(torch.tensor([bool((adv[s:e].abs() <= 1e-8).all()) for s, e in bounds]).float().mean())

    a = cfg.algorithm
    if a.name == "grpo":
        adv = cat(lambda r, G: grpo_advantages(r, G, scale_by_std=a.scale_by_std), torch.tensor(scored.total))
        return adv, {"zero_adv_groups": zero(adv)}
    ok = torch.tensor(scored.correct) > 0.5
    L = torch.tensor(batch.tokens, dtype=torch.float64)
    H = _old_entropies(batch, a.fgo.entropy)
    f = a.fgo
    adv = cat(lambda *c: fgo_advantages(*c, f.alpha, f.beta, scale_by_std=a.scale_by_std), ok, L, H)
    W = cat(lambda *c: fgo_rewards(*c, f.alpha, f.beta), ok, L, H).abs().double()
    spreads = []
    for s, e in bounds:
        for member in (ok[s:e], ~ok[s:e]):
            n = int(member.sum())
            if n >= 2:
                spreads.append(float((W[s:e][member].max() - W[s:e][member].min()) * n))
    return adv, {"fgo_entropy": float(H.mean()), "zero_adv_groups_grpo": zero(cat(grpo_advantages, ok.float())),
                 "fgo_weight_spread": sum(spreads) / len(spreads) if spreads else 0.0, "zero_adv_groups": zero(adv)}


def _old_entropies(batch, kind):
    if kind == "mean_token_entropy":
        return torch.tensor([s / max(1, n) for s, n in zip(batch.entropy_sum, batch.tokens)], dtype=torch.float64)
    lp = batch.logprobs
    width = max(1, max(len(x) for x in lp))
    return sampled_token_entropy(pad_values(lp, width).double(), pad_values([[1.0] * len(x) for x in lp], width))


CONFIGS = [["algorithm.name=grpo"], ["algorithm.name=grpo", "algorithm.scale_by_std=false"],
           ["algorithm.name=fgo"], ["algorithm.name=fgo", "algorithm.scale_by_std=true", "algorithm.fgo.alpha=0.5"],
           ["algorithm.name=fgo", "algorithm.fgo.entropy=mean_token_entropy"]]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_registry_gives_the_old_numbers_on_fixed_groups(overrides):
    cfg = load_config(None, overrides)
    for seed in range(20):
        G, P = 1 + seed % 5, 1 + seed % 4
        scored, batch = _random_step([G] * P, seed)
        got, got_stats = advantages(cfg, scored, batch, [G] * P)
        want, want_stats = _old_fixed(cfg, scored, batch, G)
        assert torch.equal(got, want) and got.dtype == want.dtype
        assert got_stats == want_stats


@pytest.mark.parametrize("overrides", CONFIGS)
def test_registry_gives_the_old_numbers_on_variable_groups(overrides):
    cfg = load_config(None, overrides)
    for seed in range(20):
        sizes = [random.Random(seed + k).randint(1, 6) for k in range(1 + seed % 5)]
        if len(set(sizes)) == 1:
            sizes.append(sizes[0] + 1)
        scored, batch = _random_step(sizes, seed)
        got, got_stats = advantages(cfg, scored, batch, sizes)
        want, want_stats = _old_variable(cfg, scored, batch, sizes)
        assert torch.equal(got, want) and got_stats == want_stats


def test_a_new_estimator_is_one_function_and_one_registration():
    @register_advantage("sign_of_reward")
    def sign_of_reward(samples, algo):
        # +1 / -1 around the group's mean reward, a toy estimator over the same index grouping.
        adv = per_group(lambda r, G: torch.sign(r - r.view(-1, G).mean(dim=1).repeat_interleave(G)),
                        samples.index, samples.rewards)
        return adv, {"sign_positive": float((adv > 0).float().mean())}

    try:
        cfg = load_config(None, ["algorithm.advantage=sign_of_reward", "rollout.group_size=2",
                                 "rollout.prompts_per_step=2"])
        make_step(cfg).check(None)  # known by name: the config is accepted
        scored, batch = _random_step([2, 2, 3], 0)
        scored.total[:] = [1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 3.0]
        adv, stats = advantages(cfg, scored, batch, [2, 2, 3])
        assert adv.tolist() == [1.0, -1.0, 0.0, 0.0, -1.0, -1.0, 1.0]
        assert stats == pytest.approx({"sign_positive": 2 / 7, "zero_adv_groups": 1 / 3})
        with pytest.raises(ValueError, match="already registered"):
            register_advantage("sign_of_reward")(sign_of_reward)
    finally:
        ADVANTAGES.pop("sign_of_reward", None)
    with pytest.raises(ConfigError, match="algorithm.advantage.*sign_of_reward"):
        make_step(cfg).check(None)
