"""GRPO / FGO steps that waste fewer rollouts: DAPO dynamic sampling, Prompt-GDRO sampling, Rollout-GDRO allocation
(docs/algorithms.md, "DAPO dynamic sampling and overlong filtering" and "GDRO").

The learner side is PolicyGradientStep's (rl/steps/policy.py, `train_on`); what differs is how a step gets its
scored groups, so here the rollouts are generated and scored while the step DRAWS its prompts, and handed to `run`
in the Draw (rl/steps/base.py), one record per sample (rl/steps/samples.py):
- Rollout-GDRO gives each prompt its own group size from its running pass rate (rl.algo.gdro.sqrt_allocation);
- dynamic sampling draws more prompts while too few groups vary (rl.algo.groups.dynamic_sampling; the constant
  groups are dropped by the group filter rl.steps.filters.drop_constant_groups), and every drawn
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

from rl.algo.gdro import GdroSampler, GdroState, sqrt_allocation
from rl.algo.groups import Selection, dynamic_sampling, expand, group_variances, summarize_selection, uniform_size
from rl.data.prompts import sampling_params
from rl.seeds import derive_seed
from rl.steps.base import Draw, Run, score_samples
from rl.steps.filters import drop_constant_groups
from rl.steps.policy import PolicyGradientStep
from rl.steps.samples import StepSamples


@dataclass
class Rounds:
    """What the adaptive step drew, round after round (the payload of its Draw): every drawn group, in draw order,
    scored and, with dynamic sampling, its constant groups already dropped (keep False)."""
    samples: StepSamples
    arms: list  # per group: the Prompt-GDRO arm it came from (None: uniform sampler)
    pass_rates: list  # per group: the prompt's running pass rate when drawn (None: never rolled out before)
    time_generate: list[float]  # per round
    time_reward: list[float]
    selection: Selection | None = None  # what the fill loop drew and kept (its counts go into the metrics)

    @classmethod
    def concat(cls, parts: list["Rounds"], selection: Selection) -> "Rounds":
        return cls(StepSamples.concat([p.samples for p in parts]), [x for p in parts for x in p.arms],
                   [x for p in parts for x in p.pass_rates], [t for p in parts for t in p.time_generate],
                   [t for p in parts for t in p.time_reward], selection)


class AdaptivePolicyStep(PolicyGradientStep):
    def __init__(self, cfg):
        super().__init__(cfg)
        g = cfg.data.gdro
        self.gdro = GdroState(g.bins, g.pass_rate_beta, g.eta, g.exploration, g.score_beta)

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

    def _round(self, run: Run, step: int, k: int, index: int) -> Rounds:
        """Draw k more prompts, generate their groups and score them."""
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
        samples = StepSamples.build(rows, sizes, batch)
        score_samples(run, samples, batch)
        rates = [self.gdro.pass_rate(row["id"]) for row in rows]
        return Rounds(samples, arms, rates, [t1 - t0], [time.perf_counter() - t1])

    def draw(self, run: Run, step: int) -> Draw:
        """Generate and score until the step's groups are settled; its items are EVERY drawn prompt (kept or
        dropped) and its sampler state the one after the last of them, which is what the step's checkpoint must
        store. The scored rounds travel to `run` as the Draw's payload."""
        cfg, P = self.cfg, self.per_step
        rounds: list[Rounds] = []
        a = cfg.algorithm
        if a.dynamic_sampling:
            def draw_groups(k: int) -> list[float]:
                rounds.append(self._round(run, step, k, len(rounds)))
                # DAPO's group filter right after scoring: the fill loop counts the groups it left (same test).
                return drop_constant_groups(rounds[-1].samples, a.dynamic_sampling_min_variance)

            selection = dynamic_sampling(draw_groups, P, a.dynamic_sampling_max_extra, a.dynamic_sampling_min_variance)
        else:
            rounds.append(self._round(run, step, P, 0))
            selection = Selection(kept=list(range(P)), rounds=1)
        drawn = Rounds.concat(rounds, selection)
        return Draw(drawn.samples.rows, run.sampler.state_dict(), drawn)

    # ------------------------------------------------------------------------------------------------- run
    def run(self, run: Run, step: int, draw: Draw) -> dict:
        drawn: Rounds = draw.payload
        # The dropped groups are marked in the records: train_on trains on the kept ones (the selection's, by the
        # same variance test), or, when nothing varied even at the cap, logs them all without an update.
        row = self.train_on(run, step, drawn.samples, 0, time_generate=sum(drawn.time_generate),
                            time_reward=sum(drawn.time_reward))
        self.observe(drawn)
        row.update(self.step_metrics(run, step, drawn))
        return row

    def observe(self, drawn: Rounds) -> None:
        """Every drawn group's observed pass rate feeds the running pass rates (dropped ones too: p = 0 or 1 is
        information), and the bandit gets p(1-p) of the groups its arms produced."""
        groups = []
        for row, members, arm in zip(drawn.samples.rows, drawn.samples.groups(), drawn.arms):
            groups.append((row["id"], len(members), sum(s.correct for s in members) / len(members), arm))
        self.gdro.observe(groups, self.all_ids if self.cfg.data.sampler == "gdro" else None)

    def step_metrics(self, run: Run, step: int, drawn: Rounds) -> dict:
        cfg, samples, selection = self.cfg, drawn.samples, drawn.selection
        out = {"generated_tokens": sum(samples.tokens())}  # every drawn sample, kept or dropped, was generated
        ids = [r["id"] for r in samples.rows]
        sizes = samples.sizes()
        if cfg.algorithm.dynamic_sampling:
            out.update(summarize_selection(selection))
            out["time_generate_extra"] = sum(drawn.time_generate[1:])  # what the extra draws cost
            total, correct = samples.totals(), samples.verdicts()
            out["reward_drawn"] = sum(total) / len(total)
            out["accuracy_drawn"] = sum(correct) / len(correct)
            run.metrics.log_event("dynamic_sampling", {
                "step": step, "kept": [ids[g] for g in selection.kept], "dropped": [ids[g] for g in selection.dropped],
                "variances": group_variances(total, sizes), "rounds": selection.rounds, "capped": selection.capped})
        if cfg.rollout.allocation == "gdro":
            out.update(alloc_size_min=min(sizes), alloc_size_max=max(sizes))
            # The pass rates the sizes were allocated by (before this step's own rollouts updated them).
            run.metrics.log_event("allocation", {"step": step, "ids": ids, "sizes": sizes,
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


__all__ = ["AdaptivePolicyStep", "Rounds", "policy_step"]
