"""Pass-rate-driven prompt sampling and rollout allocation (GDRO), as pure Python / numpy (no Ray, no torch).

Following Panaganti et al. 2026, "Group Distributionally Robust Optimization-Driven Reinforcement Learning for LLM
Reasoning" (arXiv:2601.19280), as far as its abstract and public summaries describe it (the body of the paper
could not be read from here; docs/algorithms.md, "GDRO", says what is the paper's and what is ours):
- an online difficulty classifier: each prompt's running pass rate, from its own rollouts, sorts it into one of
  `bins` equal-width difficulty bins (prompts never rolled out sit in an extra "unseen" arm);
- Prompt-GDRO (`data.sampler: gdro`): an exponentiated-gradient (multiplicative-weights) bandit over those arms
  picks the arm of every drawn prompt, then a prompt uniformly inside it, so a bin's share of the step does not
  depend on how many prompts it holds (no frequency bias). An arm's gain is the EMA-debiased mean of p(1-p) over
  the groups drawn from it: the Bernoulli reward variance, which is what a GRPO group can learn from (0 for
  prompts always or never solved, largest at the learning frontier p = 0.5);
- Rollout-GDRO (`rollout.allocation: gdro`): at a fixed budget of prompts_per_step x group_size samples, prompt i
  gets n_i samples minimising the variance proxy sum_i p_i(1-p_i) / n_i, with min_size <= n_i <= max_size. The
  continuous optimum is the square-root rule n_i = clip(sqrt(p_i(1-p_i)) / sqrt(mu), min, max), mu the shadow
  price of the budget; the greedy marginal allocation below is the exact integer optimum of that convex problem.
Running estimates are debiased EMAs as Adam corrects its moments (Kingma & Ba 2015): m_k = b m_{k-1} + (1-b) x_k,
estimate m_k / (1 - b^k), so the first observation is taken at face value instead of being shrunk towards 0.
"""
from __future__ import annotations

import copy
import heapq
import math
from typing import Sequence

import numpy as np

from rl.seeds import GDRO_KEY, numpy_rng


class DebiasedEma:
    """Bias-corrected exponential moving averages, one per key."""

    def __init__(self, beta: float):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
        self.beta, self.m, self.k = beta, {}, {}

    def update(self, key, x: float) -> None:
        self.m[key] = self.beta * self.m.get(key, 0.0) + (1.0 - self.beta) * float(x)
        self.k[key] = self.k.get(key, 0) + 1

    def get(self, key, default=None):
        if key not in self.k:
            return default
        return self.m[key] / (1.0 - self.beta ** self.k[key])

    def __contains__(self, key) -> bool:
        return key in self.k

    def state_dict(self) -> dict:
        # JSON keys are strings: kept as [key, m, k] triples so int keys (arms) survive the round trip.
        return {"beta": self.beta, "entries": [[key, self.m[key], self.k[key]] for key in self.k]}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])
        self.m = {key: float(m) for key, m, _ in state["entries"]}
        self.k = {key: int(k) for key, _, k in state["entries"]}


def difficulty_bin(pass_rate: float | None, bins: int) -> int:
    """Equal-width bins over [0, 1]; bin `bins` is the unseen arm (no rollout of the prompt yet)."""
    if pass_rate is None:
        return bins
    return min(bins - 1, max(0, int(pass_rate * bins)))


def bernoulli_variance(rate: float, n: int) -> float | None:
    """Unbiased estimate of p(1-p) from n samples of observed rate `rate` (p^(1-p^) is low by a factor (n-1)/n);
    None for n < 2 (no variance can be seen in one sample)."""
    return rate * (1.0 - rate) * n / (n - 1) if n >= 2 else None


class BinBandit:
    """Prompt-GDRO's adversary: Hedge / exponentiated gradient over `arms`, log w_b += eta * gain_b every step for
    every arm that holds prompts, sampled as (1 - exploration) softmax(log w) + exploration uniform over the arms
    that still hold prompts.

    gain_b is the EMA-debiased mean reward of arm b; an arm never pulled yet gets the best known gain, so it is
    neither starved nor favoured before it has been tried. An empty arm (no prompt at that difficulty now) keeps
    its weight: it cannot be drawn, and must not pile up weight it would spend all at once when it fills."""

    def __init__(self, arms: int, eta: float = 1.0, exploration: float = 0.1, score_beta: float = 0.9):
        self.arms, self.eta, self.exploration = arms, eta, exploration
        self.log_w = [0.0] * arms
        self.gains = DebiasedEma(score_beta)

    def gain(self, arm: int) -> float:
        known = [self.gains.get(b) for b in range(self.arms) if b in self.gains]
        return self.gains.get(arm, max(known) if known else 0.25)

    def update(self, rewards: dict[int, list[float]], available: Sequence[bool] | None = None) -> None:
        """One step of feedback: the rewards of the groups drawn from each arm this step; `available`: which arms
        hold prompts now (None: all)."""
        for arm, values in sorted(rewards.items()):
            if values:
                self.gains.update(arm, sum(values) / len(values))
        available = [True] * self.arms if available is None else available
        self.log_w = [w + self.eta * self.gain(b) if ok else w
                      for b, (w, ok) in enumerate(zip(self.log_w, available))]
        top = max(self.log_w)
        self.log_w = [w - top for w in self.log_w]  # only differences matter; keeps the numbers bounded above

    def weights(self) -> list[float]:
        """softmax(log w): the adversary's distribution over arms, before exploration and availability."""
        z = [math.exp(w) for w in self.log_w]
        return [x / sum(z) for x in z]

    def probabilities(self, available: Sequence[bool]) -> list[float]:
        q = [w if ok else 0.0 for w, ok in zip(self.weights(), available)]
        n_ok = sum(bool(a) for a in available)
        if n_ok == 0:
            raise ValueError("no arm holds a prompt")
        total = sum(q)
        mix = self.exploration if total > 0 else 1.0
        return [((1 - mix) * x / total if total > 0 else 0.0) + (mix / n_ok if ok else 0.0)
                for x, ok in zip(q, available)]

    def state_dict(self) -> dict:
        return {"log_w": list(self.log_w), "gains": self.gains.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["log_w"]) != self.arms:
            raise ValueError(f"bandit state has {len(state['log_w'])} arms, this run {self.arms} (data.gdro.bins)")
        self.log_w = [float(w) for w in state["log_w"]]
        self.gains.load_state_dict(state["gains"])


class GdroState:
    """What both GDRO controllers learn from: per-prompt pass rates, and the bandit over difficulty arms. The step
    owns it (checkpointed as its `step_state`); the sampler reads it."""

    def __init__(self, bins: int = 5, pass_rate_beta: float = 0.5, eta: float = 1.0, exploration: float = 0.1,
                 score_beta: float = 0.9):
        self.bins = bins
        self.pass_rates = DebiasedEma(pass_rate_beta)
        self.bandit = BinBandit(bins + 1, eta, exploration, score_beta)

    def pass_rate(self, prompt_id) -> float | None:
        return self.pass_rates.get(str(prompt_id))

    def arm(self, prompt_id) -> int:
        return difficulty_bin(self.pass_rate(prompt_id), self.bins)

    def observe(self, groups: list[tuple[str, int, float, int | None]], all_ids: Sequence | None = None) -> None:
        """groups: (prompt id, samples, observed pass rate, arm it was drawn from) of every group of the step.
        all_ids: every prompt the sampler draws from, to update the bandit (None: pass rates only)."""
        rewards: dict[int, list[float]] = {}
        for pid, n, rate, arm in groups:
            self.pass_rates.update(str(pid), rate)
            v = bernoulli_variance(rate, n)
            if arm is not None and v is not None:
                rewards.setdefault(arm, []).append(v)
        if all_ids is not None:
            self.bandit.update(rewards, [c > 0 for c in self.histogram(all_ids)])

    def histogram(self, ids: Sequence) -> list[int]:
        """Prompts per difficulty bin (the last entry: never rolled out)."""
        counts = [0] * (self.bins + 1)
        for pid in ids:
            counts[self.arm(pid)] += 1
        return counts

    def state_dict(self) -> dict:
        return {"bins": self.bins, "pass_rates": self.pass_rates.state_dict(), "bandit": self.bandit.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if int(state["bins"]) != self.bins:
            raise ValueError(f"GDRO state has {state['bins']} bins, this run {self.bins} (data.gdro.bins)")
        self.pass_rates.load_state_dict(state["pass_rates"])
        self.bandit.load_state_dict(state["bandit"])


class GdroSampler:
    """Prompt-GDRO's sampler, a drop-in for rl.data.loading.PromptSampler: each prompt of a batch comes from an arm drawn by
    the bandit, then uniformly from the arm's prompts not yet in the batch (a prompt appears once per batch).
    Pass rates and bandit weights are the step's state; this sampler's own state is its random stream, so a resumed
    run draws exactly what the uninterrupted one would."""

    def __init__(self, rows: list[dict], seed: int, state: GdroState):
        if not rows:
            raise ValueError("GdroSampler needs at least one row")
        self.rows, self.state = list(rows), state
        self.ids = [str(r["id"]) for r in self.rows]
        self.rng = numpy_rng(seed, GDRO_KEY)
        self.draws = 0
        self.last_arms: list[int] = []  # the arm of each prompt of the last batch (the bandit's feedback goes there)

    @property
    def epoch(self) -> int:
        return self.draws // len(self.rows)

    def next_batch(self, n: int) -> list[dict]:
        members: dict[int, list[int]] = {}
        for i, pid in enumerate(self.ids):
            members.setdefault(self.state.arm(pid), []).append(i)
        chosen, arms = [], []
        for _ in range(n):
            if not any(members.values()):  # more prompts asked than exist: start over (repeats only then)
                for i, pid in enumerate(self.ids):
                    members.setdefault(self.state.arm(pid), []).append(i)
            available = [bool(members.get(b)) for b in range(self.state.bandit.arms)]
            arm = int(self.rng.choice(len(available), p=self.state.bandit.probabilities(available)))
            chosen.append(members[arm].pop(int(self.rng.integers(len(members[arm])))))
            arms.append(arm)
        self.draws += n
        self.last_arms = arms
        return [copy.copy(self.rows[i]) for i in chosen]

    def state_dict(self) -> dict:
        return {"kind": "gdro", "rng": self.rng.bit_generator.state, "draws": self.draws, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "gdro":
            raise ValueError("sampler state is not a GDRO sampler's (the run was trained with data.sampler: uniform)")
        if int(state["num_rows"]) != len(self.rows):
            raise ValueError(f"sampler state was saved for {state['num_rows']} rows, this sampler has "
                             f"{len(self.rows)}")
        self.rng.bit_generator.state = state["rng"]
        self.draws = int(state["draws"])


def sqrt_allocation(pass_rates: Sequence[float | None], budget: int, min_size: int = 2,
                    max_size: int | None = None, floor: float = 0.05, prior: float = 0.5) -> list[int]:
    """Rollout-GDRO's group sizes: integers in [min_size, max_size] summing exactly to `budget`.

    With sigma_i^2 = p_i (1 - p_i) (p clipped to [floor, 1 - floor]: a prompt never solved in a few samples may
    still be solvable; unseen prompts take `prior`), the sizes minimise sum_i sigma_i^2 / n_i (the variance of the
    group means, GRPO's baseline). Greedy: start every prompt at min_size and hand out one sample at a time to the
    largest marginal reduction sigma_i^2 / (n_i (n_i + 1)); for this separable convex problem that is the integer
    optimum, and its continuous relaxation is the square-root rule n_i proportional to sigma_i.
    max_size None: no upper bound beyond the budget. Ties go to the earlier prompt.
    """
    P = len(pass_rates)
    hi = budget - (P - 1) * min_size if max_size is None else max_size
    if P == 0 or min_size < 1 or not P * min_size <= budget <= P * hi:
        raise ValueError(f"cannot split {budget} samples over {P} prompts with {min_size} <= n <= {hi}")
    var = []
    for p in pass_rates:
        q = min(1.0 - floor, max(floor, prior if p is None else float(p)))
        var.append(q * (1.0 - q))
    sizes = [min_size] * P
    heap = [(-v / (min_size * (min_size + 1)), i) for i, v in enumerate(var) if min_size < hi]
    heapq.heapify(heap)
    for _ in range(budget - P * min_size):
        _, i = heapq.heappop(heap)
        sizes[i] += 1
        if sizes[i] < hi:
            heapq.heappush(heap, (-var[i] / (sizes[i] * (sizes[i] + 1)), i))
    return sizes
