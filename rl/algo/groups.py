"""Variable-size groups and the DAPO dynamic-sampling selection, as pure functions (no Ray, no actors).

rl/algo/core.py's advantage functions take one fixed group size G: the samples of group g are rows g*G..g*G+G-1.
Rollout-GDRO (rl/algo/gdro.py) gives each prompt its own group size, so here a step's groups are described by their
sizes (`sizes[g]` samples, contiguous, in order) and each group's advantages are computed by the fixed-size
function on that group alone: a step whose groups all have size G gets exactly what the fixed-size call gives.

Dynamic sampling (DAPO, Yu et al. 2025, arXiv:2503.14476, section 3.2): a group whose rewards are all equal has zero
advantage under GRPO and gives no gradient, so the step keeps drawing groups until it holds enough whose rewards
vary. "Equal" is a variance threshold, never `==`: continuous rewards (length terms, weighted sums) differ in the
last bits, and an equality test would keep a group whose std is 1e-9, which GRPO's std scaling then blows up to
advantages of +-1 on pure rounding noise.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from rl.algo.core import fgo_advantages, fgo_rewards, grpo_advantages
from rl.learner.batch import split_bounds


# ------------------------------------------------------------------------------------------- group layout
def check_sizes(sizes: Sequence[int], n: int | None = None) -> list[int]:
    sizes = [int(s) for s in sizes]
    if any(s < 1 for s in sizes):
        raise ValueError(f"group sizes must be >= 1, got {sizes}")
    if n is not None and sum(sizes) != n:
        raise ValueError(f"group sizes {sizes} sum to {sum(sizes)}, not to the {n} samples")
    return sizes


def group_bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """[(start, end)] of each group's rows."""
    ends = list(itertools.accumulate(sizes))
    return [(e - s, e) for s, e in zip(sizes, ends)]


def group_index(sizes: Sequence[int]) -> list[int]:
    """The group of every row: [0]*sizes[0] + [1]*sizes[1] + ..."""
    return [g for g, s in enumerate(sizes) for _ in range(s)]


def worker_bounds(sizes: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Row ranges for `parts` workers made of whole groups (a group is never split across reward workers, so
    group-relative rewards see all of its samples), the groups dealt out as evenly as split_bounds deals rows."""
    starts = [0, *itertools.accumulate(sizes)]
    return [(starts[a], starts[b]) for a, b in split_bounds(len(sizes), parts)]


def expand(values: Sequence, sizes: Sequence[int]) -> list:
    """Each value repeated for its group's rows."""
    return [v for v, s in zip(values, sizes) for _ in range(s)]


def uniform_size(sizes: Sequence[int]) -> int | None:
    """G when every group has size G, else None."""
    return sizes[0] if sizes and all(s == sizes[0] for s in sizes) else None


# ------------------------------------------------------------------------------------ grouped advantages
def grpo_advantages_grouped(rewards: Tensor, sizes: Sequence[int], scale_by_std: bool = True,
                            eps: float = 1e-6) -> Tensor:
    """grpo_advantages for groups of the given sizes: each group normalised by its own mean (and std)."""
    sizes = check_sizes(sizes, rewards.numel())
    G = uniform_size(sizes)
    if G is not None:  # the fixed-size call, bit for bit
        return grpo_advantages(rewards, G, scale_by_std=scale_by_std, eps=eps)
    return torch.cat([grpo_advantages(rewards[a:b], b - a, scale_by_std=scale_by_std, eps=eps)
                      for a, b in group_bounds(sizes)])


def fgo_advantages_grouped(correct: Tensor, lengths: Tensor, entropies: Tensor, sizes: Sequence[int],
                           alpha: float = 0.01, beta: float = 1.0, scale_by_std: bool = False) -> Tensor:
    """fgo_advantages for groups of the given sizes (each group's subgroups and softmax weights are its own)."""
    sizes = check_sizes(sizes, correct.numel())
    G = uniform_size(sizes)
    if G is not None:
        return fgo_advantages(correct, lengths, entropies, G, alpha, beta, scale_by_std=scale_by_std)
    return torch.cat([fgo_advantages(correct[a:b], lengths[a:b], entropies[a:b], b - a, alpha, beta,
                                     scale_by_std=scale_by_std) for a, b in group_bounds(sizes)])


def fgo_rewards_grouped(correct: Tensor, lengths: Tensor, entropies: Tensor, sizes: Sequence[int],
                        alpha: float = 0.01, beta: float = 1.0) -> Tensor:
    sizes = check_sizes(sizes, correct.numel())
    return torch.cat([fgo_rewards(correct[a:b], lengths[a:b], entropies[a:b], b - a, alpha, beta)
                      for a, b in group_bounds(sizes)])


def fgo_weight_spread_grouped(rewards: Tensor, correct: Tensor, sizes: Sequence[int]) -> float:
    """fgo_weight_spread over variable-size groups (mean over every subgroup of >= 2 members)."""
    spreads = []
    for a, b in group_bounds(sizes):
        W, ok = rewards[a:b].abs().double(), correct[a:b].bool()
        for member in (ok, ~ok):
            n = int(member.sum())
            if n >= 2:
                spreads.append(float((W[member].max() - W[member].min()) * n))
    return sum(spreads) / len(spreads) if spreads else 0.0


def zero_advantage_groups_grouped(advantages: Tensor, sizes: Sequence[int], tol: float = 1e-8) -> Tensor:
    """Bool per group: every advantage in it is ~0 (the group gives no gradient)."""
    return torch.tensor([bool((advantages[a:b].abs() <= tol).all()) for a, b in group_bounds(sizes)])


# ------------------------------------------------------------------------------- dynamic sampling (DAPO)
def group_variances(rewards: Sequence[float], sizes: Sequence[int]) -> list[float]:
    """Population variance of each group's rewards (0 for a group of one), in float64."""
    r = torch.as_tensor(list(rewards), dtype=torch.float64)
    return [float(r[a:b].var(unbiased=False)) if b - a > 1 else 0.0 for a, b in group_bounds(sizes)]


def is_varying(variance: float, min_variance: float) -> bool:
    """A group teaches GRPO only if its rewards really differ: variance strictly above the threshold."""
    return variance > min_variance


@dataclass
class Selection:
    """What dynamic sampling drew for one step: group indices in draw order (0, 1, ... over all rounds)."""
    kept: list[int] = field(default_factory=list)  # varying groups, in draw order: the step trains on these
    dropped: list[int] = field(default_factory=list)  # constant groups (variance <= threshold)
    rounds: int = 0  # draw rounds, the first included
    capped: bool = False  # stopped at the cap on extra groups before `need` varying groups were found

    @property
    def drawn(self) -> int:
        return len(self.kept) + len(self.dropped)


def dynamic_sampling(draw: Callable[[int], list[float]], need: int, max_extra: int, min_variance: float) \
        -> Selection:
    """DAPO's fill loop. `draw(k)` draws k more groups and returns their reward variances (in order).

    Round 1 draws `need` groups; every later round draws just the groups still missing, and no more than the
    `max_extra` extra groups (beyond the first `need`) allowed in all. The step trains on the varying groups
    found, at most `need`; when the cap is reached first it trains on fewer (`capped`), possibly none.
    """
    if need < 1 or max_extra < 0:
        raise ValueError(f"need must be >= 1 and max_extra >= 0, got {need}, {max_extra}")
    sel, extra_left, k = Selection(), max_extra, need
    while k > 0:
        variances = draw(k)
        if len(variances) != k:
            raise ValueError(f"draw({k}) returned {len(variances)} groups")
        base = sel.drawn
        for i, v in enumerate(variances):
            (sel.kept if is_varying(v, min_variance) else sel.dropped).append(base + i)
        sel.rounds += 1
        missing = need - len(sel.kept)
        k = min(missing, extra_left)
        extra_left -= k
        sel.capped = missing > 0 and k == 0
    return sel


def summarize_selection(sel: Selection) -> dict:
    return {"ds_groups_drawn": sel.drawn, "ds_groups_kept": len(sel.kept), "ds_groups_dropped": len(sel.dropped),
            "ds_rounds": sel.rounds, "ds_capped": float(sel.capped)}


__all__ = ["Selection", "check_sizes", "dynamic_sampling", "expand", "fgo_advantages_grouped",
           "fgo_rewards_grouped", "fgo_weight_spread_grouped", "group_bounds", "group_index", "group_variances",
           "grpo_advantages_grouped", "is_varying", "summarize_selection", "uniform_size", "worker_bounds",
           "zero_advantage_groups_grouped"]
