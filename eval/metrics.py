"""Per-benchmark metrics from per-sample records (Python/numpy; math-verify only for maj@k's answer equivalence).

A record is one response: `{"problem_id", "sample", "tokens", "finish_reason", "extracted", "correct", ...}` (the
lines of `samples/<benchmark>.jsonl`). Problems are the independent units: intervals resample problems, never
samples, because samples of one problem are correlated.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import numpy as np

from eval.budget import accuracy_at_budget
from eval.redundancy import markdown as redundancy_markdown
from eval.redundancy import redundancy_metrics
from eval.stats import bootstrap_ci, pass_at_k


def group_by_problem(records: Iterable[dict]) -> dict[str, list[dict]]:
    """problem id -> its records sorted by sample index, in first-seen problem order."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r["problem_id"]), []).append(r)
    return {pid: sorted(rs, key=lambda r: r["sample"]) for pid, rs in groups.items()}


def k_values(n: int) -> list[int]:
    """The k reported for pass@k / maj@k: powers of two below n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def vote_key(extracted: str | None) -> str | None:
    """The extracted answer without spacing, `$` and a trailing period (None: no answer, no vote)."""
    if extracted is None:
        return None
    key = re.sub(r"\s+", "", str(extracted)).strip("$").rstrip(".")
    return key or None


def _math_equivalence(a: str, b: str) -> bool:
    from rewards.answers import same_answer  # math-verify (sympy): only once maj@k is computed

    return same_answer(a, b)


def majority_correct(records: list[dict], same: Callable[[str, str], bool] | None = None) -> bool:
    """Is the most voted answer among `records` correct? Votes go to classes of equivalent answers (`same`, default
    math-verify's equivalence: `\\frac12` and `0.5` are one answer, as in Qwen2.5-Math's and lighteval's maj@k), not
    to literal strings. Ties go to the class seen first; responses without an answer do not vote; no answer at all
    counts as wrong. The class is as correct as its first member (the verifier already judged each response)."""
    same = same or _math_equivalence
    classes: list[list[int]] = []  # indices of records, per class of equivalent answers, in first-seen order
    keys = [vote_key(r.get("extracted")) for r in records]
    for i, key in enumerate(keys):
        if key is None:
            continue
        home = next((c for c in classes if keys[c[0]] == key or same(keys[c[0]], key)), None)
        if home is None:
            classes.append([i])
        else:
            home.append(i)
    if not classes:
        return False
    top = max(len(c) for c in classes)
    winner = next(c for c in classes if len(c) == top)
    return bool(records[winner[0]]["correct"])


def _token_stats(tokens: list[int]) -> dict:
    if not tokens:
        return {"mean": None, "median": None, "n": 0}
    return {"mean": float(np.mean(tokens)), "median": float(np.median(tokens)), "n": len(tokens)}


def benchmark_metrics(records: list[dict], *, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0,
                      budget: int | None = None) -> dict:
    """accuracy (avg@n) with a bootstrap interval over problems, unbiased pass@k, maj@k, token statistics overall /
    correct / incorrect, truncation rate, ACT (accuracy in % per 100 response tokens, the FGO paper's metric),
    `accuracy_at_budget` (eval.budget; `budget`: the eval's max_new_tokens, default the longest response) and, on
    testbed problems, the redundancy metrics of eval.redundancy."""
    problems = group_by_problem(records)
    if not problems:
        raise ValueError("benchmark_metrics: no records")
    sizes = {len(rs) for rs in problems.values()}
    if len(sizes) != 1:
        raise ValueError(f"every problem needs the same number of samples, got sizes {sorted(sizes)}")
    n = sizes.pop()
    correct = np.array([[bool(r["correct"]) for r in rs] for rs in problems.values()])  # [P, n]
    per_problem = correct.mean(axis=1)
    lo, hi = bootstrap_ci(per_problem, confidence=confidence, n_boot=n_boot, seed=seed)
    counts = correct.sum(axis=1)
    flat = [r for rs in problems.values() for r in rs]
    tokens = [int(r["tokens"]) for r in flat]
    accuracy = float(per_problem.mean())
    mean_tokens = float(np.mean(tokens))
    return {
        "num_problems": len(problems),
        "samples_per_problem": n,
        "accuracy": accuracy,
        "accuracy_ci": [lo, hi],
        "confidence": confidence,
        "pass_at_k": {str(k): float(np.mean([pass_at_k(n, int(c), k) for c in counts])) for k in k_values(n)},
        "maj_at_k": {str(k): float(np.mean([majority_correct(rs[:k]) for rs in problems.values()]))
                     for k in k_values(n)},
        "tokens": _token_stats(tokens),
        "tokens_correct": _token_stats([int(r["tokens"]) for r in flat if r["correct"]]),
        "tokens_incorrect": _token_stats([int(r["tokens"]) for r in flat if not r["correct"]]),
        "truncation_rate": sum(r["finish_reason"] == "length" for r in flat) / len(flat),
        "no_answer_rate": sum(r.get("extracted") is None for r in flat) / len(flat),
        "act": 100.0 * accuracy / (mean_tokens / 100.0) if mean_tokens > 0 else None,
        "accuracy_at_budget": accuracy_at_budget(flat, budget),
        **redundancy_metrics(flat),  # {} unless the records carry testbed step counts
    }


def per_problem_means(records: list[dict]) -> dict[str, tuple[float, float]]:
    """problem id -> (accuracy over its samples, mean response tokens over its samples)."""
    return {pid: (float(np.mean([bool(r["correct"]) for r in rs])), float(np.mean([r["tokens"] for r in rs])))
            for pid, rs in group_by_problem(records).items()}


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(results: dict[str, dict]) -> str:
    """One row per benchmark of `benchmark_metrics` results (accuracy and rates in %)."""
    head = ("| benchmark | problems x samples | accuracy % [95% CI] | pass@n % | maj@n % | tokens mean / median | "
            "tokens correct / incorrect | truncated % | ACT |")
    lines = [head, "|" + "|".join(["---"] * 9) + "|"]
    for name, m in results.items():
        n = str(m["samples_per_problem"])
        lo, hi = m["accuracy_ci"]
        lines.append(
            f"| {name} | {m['num_problems']} x {n} | {100 * m['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | "
            f"{100 * m['pass_at_k'][n]:.1f} | {100 * m['maj_at_k'][n]:.1f} | "
            f"{_fmt(m['tokens']['mean'], '.0f')} / {_fmt(m['tokens']['median'], '.0f')} | "
            f"{_fmt(m['tokens_correct']['mean'], '.0f')} / {_fmt(m['tokens_incorrect']['mean'], '.0f')} | "
            f"{100 * m['truncation_rate']:.1f} | {_fmt(m['act'], '.2f')} |")
    return "\n".join(lines) + "\n" + redundancy_markdown(results)
