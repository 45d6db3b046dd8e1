"""Advantage estimators, keyed by name: what turns a step's scored samples into one advantage per sample.

A step's groups are given by an index array, the group of every sample (`Samples.index`), never by a group size,
so Rollout-GDRO's variable groups need nothing of their own. Each estimator is written once, over one group, with
the fixed-size functions of rl/algo/core.py; `per_group` runs it over the index: one call on the [groups, G]
layout when every group has G samples in order (what a plain GRPO step always has, so its numbers are exactly the
fixed-size call's), else one call per group.

Adding an estimator: one function `(samples, algo) -> (advantages [N], stats)` under `@register_advantage("name")`
here (or in a module imported here), and `algorithm.advantage: name` in a config (rl/steps/policy.py looks it up;
null means the algorithm's own, `grpo` or `fgo`). GRPO's two forms (std-normalised, Dr.GRPO without the std) are
one estimator with `algorithm.scale_by_std`, as are FGO's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from rl.algo.core import (fgo_advantages, fgo_rewards, fgo_subgroup_spreads, grpo_advantages, sampled_token_entropy,
                          zero_advantage_groups)
from rl.learner.batch import pad_values


@dataclass
class Samples:
    """A step's samples as an estimator reads them, one entry per sample, in batch order."""
    index: Tensor  # long: the group of each sample; groups are numbered 0, 1, ... (a prompt's samples)
    rewards: Tensor  # weighted total reward
    correct: Tensor  # bool: the verifier's verdict (`reward.accuracy` > 0.5)
    lengths: Tensor  # float64: response tokens
    logprobs: list[list[float]]  # the sampled tokens' log-probs, as the rollout measured them
    entropy_sum: list[float]  # summed full-vocabulary entropy per response (0.0 where not measured)

    @classmethod
    def build(cls, index: Sequence[int], total: Sequence[float], correct: Sequence[float],
              response_ids: Sequence[Sequence[int]], logprobs: list[list[float]], entropy_sum: list[float]) \
            -> "Samples":
        return cls(torch.as_tensor(list(index), dtype=torch.long), torch.tensor(list(total)),
                   torch.tensor(list(correct)) > 0.5,
                   torch.tensor([len(r) for r in response_ids], dtype=torch.float64), logprobs, entropy_sum)


Estimator = Callable[[Samples, object], tuple[Tensor, dict]]
ADVANTAGES: dict[str, Estimator] = {}


def register_advantage(name: str) -> Callable[[Estimator], Estimator]:
    def add(fn: Estimator) -> Estimator:
        if name in ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGES[name] = fn
        return fn
    return add


def estimator_name(algo) -> str:
    """The estimator an algorithm config selects: `algorithm.advantage`, else the algorithm's own name."""
    return algo.advantage or algo.name


def compute_advantages(samples: Samples, algo) -> tuple[Tensor, dict]:
    """The configured estimator's advantages and its diagnostics, plus `zero_adv_groups` (the fraction of groups
    that give no gradient)."""
    name = estimator_name(algo)
    if name not in ADVANTAGES:
        raise KeyError(f"no advantage estimator {name!r} (known: {', '.join(sorted(ADVANTAGES))})")
    adv, stats = ADVANTAGES[name](samples, algo)
    return adv, {**stats, "zero_adv_groups": zero_group_fraction(adv, samples.index)}


# ------------------------------------------------------------------------------------------- grouping by index
def uniform_groups(index: Tensor) -> int | None:
    """G when the samples are groups 0, 1, ... of G samples each, in order (the [groups, G] layout), else None."""
    n = index.numel()
    if n == 0:
        return None
    groups = int(index.max()) + 1
    if n % groups:
        return None
    G = n // groups
    return G if torch.equal(index, torch.arange(groups).repeat_interleave(G)) else None


def group_rows(index: Tensor) -> list[Tensor]:
    """The rows of each group, in group order."""
    return [torch.nonzero(index == g).squeeze(1) for g in range(int(index.max()) + 1)] if index.numel() else []


def per_group(fn: Callable[..., Tensor], index: Tensor, *columns: Tensor) -> Tensor:
    """fn(*columns, group_size) -> [n], a fixed-size function of rl/algo/core.py, over the groups of `index`.

    One call when the layout is [groups, G] (the fixed-size result, bit for bit); otherwise one call per group,
    each group's values written back to its own rows."""
    for c in columns:
        if c.shape != index.shape:
            raise ValueError(f"{c.numel()} values for the {index.numel()} samples of the group index")
    G = uniform_groups(index)
    if G is not None:
        return fn(*columns, G)
    out = None
    for rows in group_rows(index):
        part = fn(*(c[rows] for c in columns), rows.numel())
        if out is None:
            out = torch.zeros(index.numel(), dtype=part.dtype)
        out[rows] = part
    return out


def zero_groups(advantages: Tensor, index: Tensor, tol: float = 1e-8) -> Tensor:
    """Bool per group: every advantage in it is ~0 (the group gives no gradient)."""
    G = uniform_groups(index)
    if G is not None:
        return zero_advantage_groups(advantages, G, tol)
    return torch.tensor([bool((advantages[rows].abs() <= tol).all()) for rows in group_rows(index)])


def zero_group_fraction(advantages: Tensor, index: Tensor) -> float:
    return float(zero_groups(advantages, index).float().mean())


# ------------------------------------------------------------------------------------------------- estimators
@register_advantage("grpo")
def grpo(samples: Samples, algo) -> tuple[Tensor, dict]:
    """Group-relative: the weighted total reward minus its group mean, divided by the group std unless
    `scale_by_std` is false (Dr.GRPO)."""
    return per_group(lambda r, G: grpo_advantages(r, G, scale_by_std=algo.scale_by_std), samples.index,
                     samples.rewards), {}


@register_advantage("fgo")
def fgo(samples: Samples, algo) -> tuple[Tensor, dict]:
    """FGO (docs/algorithms.md, "FGO"): correctness reweighted by length and entropy inside each correct /
    incorrect subgroup; the other reward terms do not enter."""
    f, ok, L, idx = algo.fgo, samples.correct, samples.lengths, samples.index
    H = fgo_entropies(samples, f.entropy)
    uniform_wrong = f.weighted_subgroups == "correct"
    adv = per_group(lambda c, l, h, G: fgo_advantages(c, l, h, G, f.alpha, f.beta, scale_by_std=algo.scale_by_std,
                                                      uniform_wrong=uniform_wrong), idx, ok, L, H)
    weights = per_group(lambda c, l, h, G: fgo_rewards(c, l, h, G, f.alpha, f.beta, uniform_wrong=uniform_wrong),
                        idx, ok, L, H)
    # What GRPO would have wasted on the very same rollouts: groups whose +-1 rewards are all equal.
    grpo_zero = zero_group_fraction(per_group(grpo_advantages, idx, ok.float()), idx)
    return adv, {"fgo_entropy": float(H.mean()), "fgo_weight_spread": fgo_weight_spread(weights, ok, idx),
                 "zero_adv_groups_grpo": grpo_zero}


def fgo_entropies(samples: Samples, kind: str) -> Tensor:
    """H_i per response from what the rollout measured at generation time (no second forward pass)."""
    if kind == "mean_token_entropy":
        return torch.tensor([s / max(1, int(n)) for s, n in zip(samples.entropy_sum, samples.lengths.tolist())],
                            dtype=torch.float64)
    lp = samples.logprobs
    width = max(1, max(len(x) for x in lp))
    return sampled_token_entropy(pad_values(lp, width).double(), pad_values([[1.0] * len(x) for x in lp], width))


def fgo_weight_spread(weights: Tensor, correct: Tensor, index: Tensor) -> float:
    """Mean over every subgroup of >= 2 members of (max W - min W) * |S| (rl.algo.core.fgo_subgroup_spreads)."""
    G = uniform_groups(index)
    if G is not None:
        spreads = fgo_subgroup_spreads(weights, correct, G)
        return float(spreads.mean()) if spreads.numel() else 0.0
    spreads = [float(s) for rows in group_rows(index)
               for s in fgo_subgroup_spreads(weights[rows], correct[rows], rows.numel())]
    return sum(spreads) / len(spreads) if spreads else 0.0


__all__ = ["ADVANTAGES", "Samples", "compute_advantages", "estimator_name", "fgo_entropies", "fgo_weight_spread",
           "group_rows", "per_group", "register_advantage", "uniform_groups", "zero_group_fraction", "zero_groups"]
