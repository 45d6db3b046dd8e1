"""GRPO / FGO steps that waste fewer rollouts: DAPO dynamic sampling, Prompt-GDRO sampling, Rollout-GDRO allocation
(docs/algorithms.md, "DAPO dynamic sampling and overlong filtering" and "GDRO").

The learner side is PolicyGradientStep's (rl/steps/policy.py, `update`); what differs is how a step gets its
scored groups, so here the rollouts are generated and scored while the step DRAWS its prompts:
- Rollout-GDRO gives each prompt its own group size from its running pass rate (rl.algo.gdro.sqrt_allocation);
- dynamic sampling draws more prompts while too few groups vary (rl.algo.groups.dynamic_sampling), and every drawn
  prompt, kept or dropped, is part of the step's draw: the lifecycle's `prompts` event lists them all in draw
  order and the checkpointed sampler state comes after the last one, so a resumed run neither replays nor skips
  a prompt;
- Prompt-GDRO's sampler (rl.algo.gdro.GdroSampler) reads the pass rates and bandit this step owns; they are updated
  after the update, from every drawn group, and saved as the step's `step_state`.
Only on-policy (trainer.max_staleness 0, checked by the config): a draw depends on the previous step's rewards.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from rewards.isolation import RewardResult, merge_results
from rl.contracts import RolloutBatch
from rl.algo.gdro import GdroSampler, GdroState, sqrt_allocation
from rl.algo.groups import (Selection, dynamic_sampling, expand, group_bounds, group_variances, summarize_selection,
                            uniform_size)
from rl.data.prompts import sampling_params
from rl.scoring.score import ScoredBatch
from rl.seeds import derive_seed
from rl.steps.base import Run
from rl.steps.policy import PolicyGradientStep, advantages


@dataclass
class Drawn:
    """Everything a step drew, round after round, in draw order: one entry per group (rows, sizes, arms) or per
    sample (batch, scored)."""
    rows: list[dict]
    sizes: list[int]
    arms: list  # Prompt-GDRO arm each prompt came from (None: uniform sampler)
    pass_rates: list  # each prompt's running pass rate when it was drawn (None: never rolled out before)
    batch: RolloutBatch
    scored: ScoredBatch
    time_generate: list[float]  # per round
    time_reward: list[float]

    def take(self, groups: list[int]) -> "Drawn":
        """The given groups (in the given order), with their samples."""
        bounds = group_bounds(self.sizes)
        idx = [i for g in groups for i in range(*bounds[g])]
        return Drawn([self.rows[g] for g in groups], [self.sizes[g] for g in groups], [self.arms[g] for g in groups],
                     [self.pass_rates[g] for g in groups], take_batch(self.batch, idx), take_scored(self.scored, idx),
                     self.time_generate, self.time_reward)


def take_batch(batch: RolloutBatch, idx: list[int]) -> RolloutBatch:
    return RolloutBatch(**{k: [v[i] for i in idx] for k, v in vars(batch).items()})


def take_scored(scored: ScoredBatch, idx: list[int]) -> ScoredBatch:
    """The samples `idx`; failure counts and messages stay the step's (they describe what the workers ran)."""
    res = scored.result
    sub = RewardResult({k: [v[i] for i in idx] for k, v in res.scores.items()}, dict(res.failures),
                       dict(res.timeouts), dict(res.nones), dict(res.seconds), list(res.errors))
    return ScoredBatch([scored.total[i] for i in idx], [scored.correct[i] for i in idx], sub)


def concat_scored(parts: list[ScoredBatch]) -> ScoredBatch:
    return ScoredBatch([x for p in parts for x in p.total], [x for p in parts for x in p.correct],
                       merge_results([p.result for p in parts]))


class AdaptivePolicyStep(PolicyGradientStep):
    def __init__(self, cfg):
        super().__init__(cfg)
        g = cfg.data.gdro
        self.gdro = GdroState(g.bins, g.pass_rate_beta, g.eta, g.exploration, g.score_beta)
        self.drawn: tuple[Drawn, Selection] | None = None

    def make_sampler(self, items: list):
        if self.cfg.data.sampler == "gdro":
            return GdroSampler(items, self.cfg.trainer.seed, self.gdro)
        return super().make_sampler(items)

    def start(self, run: Run) -> dict:
        self.all_ids = [r["id"] for r in run.sampler.rows]
        return super().start(run)  # the pipeline: only its close() is used (nothing is generated ahead)

    # ------------------------------------------------------------------------------------------------ draw
    def sizes(self, rows: list[dict]) -> list[int]:
        """Samples per prompt: group_size each, or Rollout-GDRO's square-root allocation of the same budget."""
        r = self.cfg.rollout
        if r.allocation != "gdro":
            return [r.group_size] * len(rows)
        g = r.gdro
        return sqrt_allocation([self.gdro.pass_rate(row["id"]) for row in rows], len(rows) * r.group_size,
                               g.min_group_size, g.max_group_size or 2 * r.group_size, g.pass_rate_floor)

    def _round(self, run: Run, step: int, k: int, index: int) -> Drawn:
        rows = run.sampler.next_batch(k)
        arms = list(getattr(run.sampler, "last_arms", None) or [None] * k)
        sizes = self.sizes(rows)
        t0 = time.perf_counter()
        # Round 0 uses the seed an unadapted step would (rl/steps/pipeline.py); each extra round its own.
        seed = derive_seed(self.cfg.trainer.seed, "rollout", step, index)
        G = uniform_size(sizes)
        prompts = [r["prompt"] for r in rows]
        if G is not None:
            batch = run.generate(prompts, sampling_params(self.cfg, n=G), seed=seed)
        else:  # n differs per prompt: each prompt repeated n_i times, one sample each (same layout as n = G)
            batch = run.generate(expand(prompts, sizes), sampling_params(self.cfg, n=1), seed=seed)
        t1 = time.perf_counter()
        scored = run.score(rows, batch, G if G is not None else sizes)
        rates = [self.gdro.pass_rate(row["id"]) for row in rows]
        return Drawn(rows, sizes, arms, rates, batch, scored, [t1 - t0], [time.perf_counter() - t1])

    def draw(self, run: Run, step: int) -> tuple[list, dict]:
        """Generate and score until the step's groups are settled; returns EVERY drawn prompt (kept or dropped) and
        the sampler state after the last one, which is what the step's checkpoint must store."""
        cfg, P = self.cfg, self.per_step
        rounds: list[Drawn] = []

        def draw_groups(k: int) -> list[float]:
            rounds.append(self._round(run, step, k, len(rounds)))
            return group_variances(rounds[-1].scored.total, rounds[-1].sizes)

        a = cfg.algorithm
        if a.dynamic_sampling:
            selection = dynamic_sampling(draw_groups, P, a.dynamic_sampling_max_extra, a.dynamic_sampling_min_variance)
        else:
            draw_groups(P)
            selection = Selection(kept=list(range(P)), rounds=1)
        drawn = Drawn([r for d in rounds for r in d.rows], [n for d in rounds for n in d.sizes],
                      [x for d in rounds for x in d.arms], [x for d in rounds for x in d.pass_rates],
                      RolloutBatch.concat([d.batch for d in rounds]),
                      concat_scored([d.scored for d in rounds]), [t for d in rounds for t in d.time_generate],
                      [t for d in rounds for t in d.time_reward])
        self.drawn = (drawn, selection)
        return drawn.rows, run.sampler.state_dict()

    # ------------------------------------------------------------------------------------------------- run
    def run(self, run: Run, step: int, rows: list[dict]) -> dict:
        drawn, selection = self.drawn
        self.drawn = None
        # Nothing varied even at the cap: the metrics describe what was drawn, and no update is made.
        trained = drawn.take(selection.kept) if selection.kept else drawn
        adv, algo_stats = advantages(self.cfg, trained.scored, trained.batch, trained.sizes)
        row = self.update(run, step, trained.rows, trained.batch, trained.scored, adv, algo_stats, 0,
                          train=bool(selection.kept), time_generate=sum(drawn.time_generate),
                          time_reward=sum(drawn.time_reward))
        self.observe(drawn)
        row.update(self.step_metrics(run, step, drawn, selection))
        return row

    def observe(self, drawn: Drawn) -> None:
        """Every drawn group's observed pass rate feeds the running pass rates (dropped ones too: p = 0 or 1 is
        information), and the bandit gets p(1-p) of the groups its arms produced."""
        groups = []
        for row, n, arm, (a, b) in zip(drawn.rows, drawn.sizes, drawn.arms, group_bounds(drawn.sizes)):
            groups.append((row["id"], n, sum(drawn.scored.correct[a:b]) / n, arm))
        self.gdro.observe(groups, self.all_ids if self.cfg.data.sampler == "gdro" else None)

    def step_metrics(self, run: Run, step: int, drawn: Drawn, selection: Selection) -> dict:
        cfg = self.cfg
        out = {"generated_tokens": sum(drawn.batch.tokens)}  # every drawn sample, kept or dropped, was generated
        ids = [r["id"] for r in drawn.rows]
        if cfg.algorithm.dynamic_sampling:
            out.update(summarize_selection(selection))
            out["time_generate_extra"] = sum(drawn.time_generate[1:])  # what the extra draws cost
            out["reward_drawn"] = sum(drawn.scored.total) / len(drawn.scored.total)
            out["accuracy_drawn"] = sum(drawn.scored.correct) / len(drawn.scored.correct)
            variances = group_variances(drawn.scored.total, drawn.sizes)
            run.metrics.log_event("dynamic_sampling", {
                "step": step, "kept": [ids[g] for g in selection.kept], "dropped": [ids[g] for g in selection.dropped],
                "variances": variances, "rounds": selection.rounds, "capped": selection.capped})
        if cfg.rollout.allocation == "gdro":
            out.update(alloc_size_min=min(drawn.sizes), alloc_size_max=max(drawn.sizes))
            # The pass rates the sizes were allocated by (before this step's own rollouts updated them).
            run.metrics.log_event("allocation", {"step": step, "ids": ids, "sizes": drawn.sizes,
                                                 "pass_rates": drawn.pass_rates})
        if cfg.data.sampler == "gdro" or cfg.rollout.allocation == "gdro":
            hist = self.gdro.histogram(self.all_ids)  # after this step's pass-rate update
            out.update({f"gdro/bin_{b}": c for b, c in enumerate(hist[:-1])}, **{"gdro/unseen": hist[-1]})
            rates = [self.gdro.pass_rate(i) for i in ids]
            out["pass_rate_mean"] = sum(rates) / len(rates)
        if cfg.data.sampler == "gdro":
            out.update({f"gdro/q_{b}": w for b, w in enumerate(self.gdro.bandit.weights())})
        return out

    def state_dict(self) -> dict:
        if self.cfg.data.sampler == "gdro" or self.cfg.rollout.allocation == "gdro":
            return {"gdro": self.gdro.state_dict()}
        return {}

    def load_state_dict(self, state: dict) -> None:
        if "gdro" in state:
            self.gdro.load_state_dict(state["gdro"])


def policy_step(cfg) -> PolicyGradientStep:
    """grpo / fgo: the plain step unless a setting adapts the rollout groups (then the plain path is left as it
    was, bit for bit)."""
    if cfg.algorithm.dynamic_sampling or cfg.data.sampler == "gdro" or cfg.rollout.allocation == "gdro":
        return AdaptivePolicyStep(cfg)
    return PolicyGradientStep(cfg)


__all__ = ["AdaptivePolicyStep", "Drawn", "policy_step"]
