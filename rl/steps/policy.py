"""GRPO and FGO: rollout -> rewards -> advantages -> clipped policy-gradient update -> weight sync.

The two differ only in their advantage estimator (rl/algo/advantages.py, a registry by name): GRPO normalises the
weighted total reward within each group (Shao et al. 2024, DeepSeekMath); FGO splits each group by correctness and
reweights inside each subgroup by length and entropy, so all-correct and all-wrong groups still teach
(docs/algorithms.md, "FGO").

The rollout becomes one record per sample right after generation (rl/steps/samples.py); scoring, the advantage
estimator and the filters (rl/steps/filters.py) write into those records, and the learner's sequences are read off
the ones still kept (docs/architecture.md, "One GRPO step").
"""
from __future__ import annotations

import time

import torch

from rl.algo.advantages import ADVANTAGES, Samples, compute_advantages, estimator_name
from rl.config.base import ConfigError
from rl.contracts import TrainSequence
from rl.steps.base import Draw, Run, Step, log_rollout_events, rollout_metrics, score_samples
from rl.steps.filters import drop_truncated
from rl.steps.pipeline import RolloutPipeline
from rl.steps.samples import StepSamples


def advantages(cfg, samples: StepSamples) -> tuple[torch.Tensor, dict]:
    """The configured estimator (rl/algo/advantages.py) over the samples' groups: writes each record's advantage,
    and returns them as a tensor too, with the estimator's diagnostics and `zero_adv_groups` for the metrics."""
    recs = samples.samples
    view = Samples.build(samples.group_index(), samples.totals(), samples.verdicts(), [s.response_ids for s in recs],
                         [s.logprobs for s in recs], [s.entropy_sum for s in recs])
    adv, stats = compute_advantages(view, cfg.algorithm)
    for s, a in zip(recs, adv.tolist(), strict=True):
        s.advantage = a
    return adv, stats


# The learner statistics of a step that trained on nothing (rl.learner.updates.policy_update's keys).
NO_UPDATE = {"loss": 0.0, "clipped_tokens": 0.0, "kl_sum": 0.0, "ratio_sum": 0.0, "tokens": 0.0, "grad_norm": 0.0,
             "lr": float("nan"), "logprob_diff_sum": 0.0, "logprob_diff_max": 0.0, "logprob_diff_tokens": 0.0,
             "logprob_nonfinite": 0.0, "tis_weight_sum": 0.0}


class PolicyGradientStep(Step):
    def check(self, tokenizer) -> None:
        name = estimator_name(self.cfg.algorithm)
        if name not in ADVANTAGES:
            raise ConfigError(f"config key 'algorithm.advantage': no advantage estimator {name!r} "
                              f"(known: {', '.join(sorted(ADVANTAGES))})")

    def start(self, run: Run) -> dict:
        self.pipeline = RolloutPipeline(run, self.per_step)
        return {}

    def draw(self, run: Run, step: int) -> Draw:
        return Draw(*self.pipeline.prompts(step))  # with max_staleness 1 they may have been drawn a step ahead

    def run(self, run: Run, step: int, draw: Draw) -> dict:
        rows, G = draw.items, self.cfg.rollout.group_size
        t0 = time.perf_counter()
        batch, staleness = self.pipeline.rollout(step, rows)
        self.pipeline.start_next(step + 1)  # max_staleness 1: the next rollout runs while this step trains
        t1 = time.perf_counter()
        samples = StepSamples.build(rows, [G] * len(rows), batch)
        score_samples(run, samples, batch)
        t2 = time.perf_counter()
        return self.train_on(run, step, samples, staleness, time_generate=t1 - t0, time_reward=t2 - t1)

    def sample_filters(self, samples: StepSamples) -> dict:
        """The filters that run after advantages (rl/steps/filters.py): what they drop stays in its group's
        baseline and the metrics, and leaves only the loss. Returns their entries for the metrics row."""
        stats: dict = {}
        if self.cfg.algorithm.overlong_filter:
            stats.update(drop_truncated(samples))
        return stats

    def train_on(self, run: Run, step: int, samples: StepSamples, staleness: int = 0, **times: float) -> dict:
        """Advantages, the sample filters and one update on a step's scored samples, then bring the rollout workers
        to the new weights; returns the step's metrics row (`times` go into it as they are). Shared with
        rl/steps/adaptive.py, whose group filter may have dropped groups already."""
        cfg = self.cfg
        t2 = time.perf_counter()
        # A group filter's dropped groups leave the step: baseline, metrics and loss. When it dropped every group,
        # the metrics describe them all and nothing is trained (every keep is already False).
        kept = samples.kept_groups()
        trained = samples.take(kept) if kept and len(kept) < len(samples.rows) else samples
        _, algo_stats = advantages(cfg, trained)
        algo_stats.update(self.sample_filters(trained))
        sequences = [TrainSequence(s.prompt_ids, s.response_ids, s.logprobs, s.advantage)
                     for s in trained.samples if s.keep]
        if sequences:
            # A stale rollout came from older weights: the ratio to its own log-probs is the importance weight.
            stats = run.learner.train(sequences, cfg.algorithm.mini_batches, cfg.rollout.max_new_tokens,
                                      on_policy=not staleness)
            run.updated(step)
        else:  # nothing left to learn from (all truncated, or no varying group): the weights stay as they are
            stats = dict(NO_UPDATE)
        t3 = time.perf_counter()
        self.pipeline.settle()  # the in-flight rollout must finish on the old weights before they are replaced
        t_settled = time.perf_counter()
        run.sync()
        t4 = time.perf_counter()

        log_rollout_events(run, step, trained)
        row = {"loss": stats["loss"], **rollout_metrics(trained),
               "kl": stats["kl_sum"] / max(1.0, stats["tokens"]),
               "clip_fraction": stats["clipped_tokens"] / max(1.0, stats["tokens"]),
               "grad_norm": stats["grad_norm"], "lr": stats["lr"], **algo_stats}
        row.update(**times, time_train=t3 - t2, time_rollout_wait=t_settled - t3,
                   time_sync=t4 - t_settled, staleness=staleness,
                   ratio_mean=stats["ratio_sum"] / max(1.0, stats["tokens"]),
                   # Training-inference mismatch (rl.learner.updates.policy_update): ~0 when rollout and learner compute
                   # the same numbers, larger for an engine whose kernels or precision differ.
                   logprob_diff_mean=stats["logprob_diff_sum"] / max(1.0, stats["logprob_diff_tokens"]),
                   logprob_diff_max=stats["logprob_diff_max"],
                   logprob_nonfinite=stats["logprob_nonfinite"])  # rollout log-probs that were NaN / inf
        if cfg.algorithm.tis_cap is not None:
            row["tis_weight_mean"] = stats["tis_weight_sum"] / max(1.0, stats["tokens"])
        return row

    def finish(self, run: Run) -> dict:
        self.pipeline.close()
        return {}

    def abort(self) -> None:
        """Ctrl-C: do not wait for a rollout in flight (its actors are about to be killed)."""
        if getattr(self, "pipeline", None) is not None:
            self.pipeline.close(wait=False)
