"""Group layout and the DAPO dynamic-sampling selection, as pure functions (no Ray, no actors).

Rollout-GDRO (rl/algo/gdro.py) gives each prompt its own group size, so a step's groups are described by their
sizes (`sizes[g]` samples, contiguous, in order); `group_index` turns them into the index array (the group of every
sample) that the advantage estimators group by (rl/algo/advantages.py).

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


__all__ = ["Selection", "check_sizes", "dynamic_sampling", "expand", "group_bounds", "group_index", "group_variances",
           "is_varying", "summarize_selection", "uniform_size", "worker_bounds"]
