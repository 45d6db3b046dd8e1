"""Length-control baselines as reward functions (docs/algorithms.md, "Length-control reward baselines"), to compare
FGO against.

All follow the TRL contract and read the response length from the `completion_tokens` column (token counts,
EOS included) that the reward workers receive beside the text. The group-relative ones (Kimi, ShorterBetter,
Arora & Zanette) group samples by the `group_id` column (the samples of one prompt in a step; reasonrl never splits
a group across reward workers) and fall back to grouping by prompt text, which is what a TRL caller provides.
Correctness comes from another reward, named by `correct` (default `math_verify`, score > 0.5 = correct), so the
baselines work with any verifier.

Which ones include the correctness term:
  * `kimi_length`, `dapo_overlong`: the length term ONLY; list them next to the correctness reward with a weight.
  * `l1_exact`, `l1_max`, `shorter_better`, `efficient_reasoning`: the whole reward (correctness included); use
    them alone (or give the verifier weight 0).
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Callable

from rewards.registry import register, resolve

__all__ = ["kimi_length", "l1_exact", "l1_max", "shorter_better", "efficient_reasoning", "dapo_overlong"]


@functools.lru_cache(maxsize=None)
def _verifier(spec: str) -> Callable:
    return resolve(spec)


def _correct(spec: str, prompts, completions, columns: dict) -> list[bool]:
    scores = _verifier(spec)(prompts, completions, **columns)
    return [s is not None and float(s) > 0.5 for s in scores]


def _group_indices(prompts, group_id=None) -> list[list[int]]:
    keys = group_id if group_id is not None else prompts
    groups: dict = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return list(groups.values())


def _lengths(completion_tokens) -> list[float]:
    if completion_tokens is None:
        raise ValueError("length rewards need the `completion_tokens` column (response token counts)")
    return [float(n) for n in completion_tokens]


@register("kimi_length")
def kimi_length(prompts, completions, completion_tokens=None, group_id=None, correct: str = "math_verify",
                **columns) -> list[float]:
    """Kimi k1.5 length reward (arXiv:2501.12599 §2.3.3), per group of samples of one prompt:
    lambda_i = 0.5 - (L_i - min L) / (max L - min L); lambda_i if correct else min(0, lambda_i); all 0 when every
    response has the same length. Length term only: add it to the correctness reward with a weight."""
    L = _lengths(completion_tokens)
    ok = _correct(correct, prompts, completions, {"completion_tokens": completion_tokens, **columns})
    out = [0.0] * len(L)
    for idx in _group_indices(prompts, group_id):
        lo, hi = min(L[i] for i in idx), max(L[i] for i in idx)
        if hi == lo:
            continue
        for i in idx:
            lam = 0.5 - (L[i] - lo) / (hi - lo)
            out[i] = lam if ok[i] else min(0.0, lam)
    return out


def _targets(columns: dict, target_column: str, n: int) -> list[float]:
    if target_column not in columns:
        raise ValueError(f"L1 rewards read the target length from the dataset column {target_column!r}, which "
                         f"the data does not have (columns: {sorted(columns)})")
    return [float(t) for t in columns[target_column]][:n]


@register("l1_exact")
def l1_exact(prompts, completions, completion_tokens=None, correct: str = "math_verify",
             target_column: str = "target_tokens", alpha: float = 0.0003, **columns) -> list[float]:
    """L1-Exact (LCPO, arXiv:2503.04697): r = c - alpha * |n_gold - n_y|, n_gold from the dataset column
    `target_column` (the prompt should state it, e.g. "Think for N tokens."). alpha = 0.0003 (the paper; a public
    copy of the code uses 1/3000)."""
    L = _lengths(completion_tokens)
    ok = _correct(correct, prompts, completions, {"completion_tokens": completion_tokens, **columns})
    gold = _targets(columns, target_column, len(L))
    return [float(c) - alpha * abs(g - n) for c, g, n in zip(ok, gold, L)]


@register("l1_max")
def l1_max(prompts, completions, completion_tokens=None, correct: str = "math_verify",
           target_column: str = "target_tokens", alpha: float = 0.0003, delta: float = 0.5,
           **columns) -> list[float]:
    """L1-Max (LCPO): r = c * clip(alpha * (n_gold - n_y) + delta, 0, 1): full credit well under the budget, none
    far over it, never a reward for a wrong answer."""
    L = _lengths(completion_tokens)
    ok = _correct(correct, prompts, completions, {"completion_tokens": completion_tokens, **columns})
    gold = _targets(columns, target_column, len(L))
    return [float(c) * min(1.0, max(0.0, alpha * (g - n) + delta)) for c, g, n in zip(ok, gold, L)]


@register("shorter_better")
def shorter_better(prompts, completions, completion_tokens=None, group_id=None, correct: str = "math_verify",
                   alpha: float = 2.0, beta: float = 0.001, **columns) -> list[float]:
    """ShorterBetter (arXiv:2504.21370): r_i = alpha * c_i - beta * |L_i - SOL|, with the group's sample optimal
    length SOL = the shortest correct length, or the mean length when no response is correct."""
    L = _lengths(completion_tokens)
    ok = _correct(correct, prompts, completions, {"completion_tokens": completion_tokens, **columns})
    out = [0.0] * len(L)
    for idx in _group_indices(prompts, group_id):
        right = [L[i] for i in idx if ok[i]]
        sol = min(right) if right else sum(L[i] for i in idx) / len(idx)
        for i in idx:
            out[i] = alpha * float(ok[i]) - beta * abs(L[i] - sol)
    return out


@register("efficient_reasoning")
def efficient_reasoning(prompts, completions, completion_tokens=None, group_id=None, finish_reason=None,
                        correct: str = "math_verify", alpha: float = 0.1, **columns) -> list[float]:
    """Arora & Zanette (arXiv:2502.04463): r_i = c_i * (1 - alpha * sigmoid((L_i - mean) / (std + 1e-7))), mean and
    (population) std over the lengths of the group's CORRECT responses; 0 for a wrong or truncated response."""
    L = _lengths(completion_tokens)
    ok = _correct(correct, prompts, completions,
                  {"completion_tokens": completion_tokens, "finish_reason": finish_reason, **columns})
    if finish_reason is not None:  # no EOS: the response did not finish, so it scores 0 like a wrong one
        ok = [c and f != "length" for c, f in zip(ok, finish_reason)]
    out = [0.0] * len(L)
    for idx in _group_indices(prompts, group_id):
        right = [L[i] for i in idx if ok[i]]
        if not right:
            continue
        mean = sum(right) / len(right)
        std = math.sqrt(sum((x - mean) ** 2 for x in right) / len(right))
        for i in idx:
            if ok[i]:
                out[i] = 1.0 - alpha / (1.0 + math.exp(-(L[i] - mean) / (std + 1e-7)))
    return out


@register("dapo_overlong")
def dapo_overlong(prompts, completions, completion_tokens=None, max_tokens: int = 20480, cache_tokens: int = 4096,
                  **columns) -> list[float]:
    """DAPO soft overlong punishment (arXiv:2503.14476): 0 up to max_tokens - cache_tokens, then a linear ramp to -1
    at max_tokens, -1 beyond. Set max_tokens to the generation budget (rollout.max_new_tokens). Length term only."""
    if not 0 < cache_tokens <= max_tokens:
        raise ValueError(f"dapo_overlong needs 0 < cache_tokens <= max_tokens, got {cache_tokens}, {max_tokens}")
    free = max_tokens - cache_tokens
    out = []
    for n in _lengths(completion_tokens):
        out.append(0.0 if n <= free else ((free - n) / cache_tokens if n <= max_tokens else -1.0))
    return out
