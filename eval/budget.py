"""The accuracy-vs-budget frontier: from one eval at the full generation budget, the accuracy every smaller budget B
would have scored, and its plot for `reasonrl compare`.

A response counts at B only if it finished (finish_reason `stop`: it ended with EOS) within B tokens and is correct.
That is what generating again with `max_new_tokens = B` would give for greedy decoding (the first B tokens are the
same, and a response longer than B would be cut off, with no final answer or a truncated one), so one long eval
answers "what if the budget were smaller" without re-running. At B = the full budget it can be below `accuracy`:
a response cut off at the budget whose earlier \\boxed{} is right counts in `accuracy` but not here.
Token counts include the EOS, as everywhere in reasonrl.
"""
from __future__ import annotations

import numpy as np

SMALLEST = 64  # the first budget of the grid


def budget_grid(budget: int, per_doubling: int = 1) -> list[int]:
    """64, 128, 256, ... below `budget`, then `budget` itself; with per_doubling k, k geometric points per doubling
    (k=4: 64, 76, 91, 108, 128, ...), for responses whose lengths sit within one doubling of each other."""
    grid, i = [], 0
    while (b := round(SMALLEST * 2 ** (i / per_doubling))) < budget:
        grid.append(b)
        i += 1
    return grid + [int(budget)]


def accuracy_at_budget(records: list[dict], budget: int | None = None, per_doubling: int = 1) -> dict[str, float]:
    """{str(B): accuracy at B} over the grid up to `budget` (default: the longest response seen). Accuracy is avg@n
    like `accuracy`: the mean over problems of the share of their samples that count at B."""
    problems: dict[str, list[dict]] = {}  # grouped here: eval.metrics imports this module
    for r in records:
        problems.setdefault(str(r["problem_id"]), []).append(r)
    if not problems:
        return {}
    if budget is None:
        budget = max(int(r["tokens"]) for rs in problems.values() for r in rs)
    out = {}
    for b in budget_grid(max(1, int(budget)), per_doubling):
        per_problem = [np.mean([bool(r["correct"]) and r.get("finish_reason") == "stop" and int(r["tokens"]) <= b
                                for r in rs]) for rs in problems.values()]
        out[str(b)] = float(np.mean(per_problem))
    return out
