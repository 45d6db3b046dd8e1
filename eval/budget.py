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

from pathlib import Path

import numpy as np

SMALLEST = 64  # the first budget of the grid


def budget_grid(budget: int) -> list[int]:
    """64, 128, 256, ... below `budget`, then `budget` itself."""
    grid, b = [], SMALLEST
    while b < budget:
        grid.append(b)
        b *= 2
    return grid + [int(budget)]


def accuracy_at_budget(records: list[dict], budget: int | None = None) -> dict[str, float]:
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
    for b in budget_grid(max(1, int(budget))):
        per_problem = [np.mean([bool(r["correct"]) and r.get("finish_reason") == "stop" and int(r["tokens"]) <= b
                                for r in rs]) for rs in problems.values()]
        out[str(b)] = float(np.mean(per_problem))
    return out


def plot_accuracy_at_budget(curves: dict[str, dict[str, float]], name: str, path: Path) -> Path:
    """One line per model ({label: accuracy_at_budget}) against the budget on a log2 axis."""
    from matplotlib.figure import Figure  # Agg through Figure, as in eval.plots: the global backend is left alone

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    for (label, curve), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        xs = sorted(int(b) for b in curve)
        ys = [curve[str(b)] for b in xs]
        ax.plot(xs, ys, marker="o", color=color, label=f"{label} ({100 * ys[-1]:.1f}% at {xs[-1]})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token budget B (response finished within B tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{name}: accuracy at budget")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
