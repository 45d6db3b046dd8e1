"""GRPO and FGO: rollout -> rewards -> advantages -> clipped policy-gradient update -> weight sync.

The two differ only in their advantage estimator (rl/algo/advantages.py, a registry by name): GRPO normalises the
weighted total reward within each group (Shao et al. 2024, DeepSeekMath); FGO splits each group by correctness and
reweights inside each subgroup by length and entropy, so all-correct and all-wrong groups still teach
(docs/algorithms.md, "FGO").
"""
from __future__ import annotations

import time

import torch

from rl.algo.advantages import ADVANTAGES, Samples, compute_advantages, estimator_name
from rl.algo.groups import group_index
from rl.config.base import ConfigError
from rl.contracts import RolloutBatch, TrainSequence
from rl.steps.pipeline import RolloutPipeline
from rl.scoring.score import ScoredBatch
from rl.steps.base import Run, Step, log_rollout_events, rollout_metrics


def advantages(cfg, scored: ScoredBatch, batch: RolloutBatch, sizes: list[int]) -> tuple[torch.Tensor, dict]:
    """Per-sample advantages of the configured estimator (rl/algo/advantages.py) over groups of the given sizes
    (contiguous, in order), plus its diagnostics and `zero_adv_groups` for the step's metrics."""
    samples = Samples.build(group_index(sizes), scored.total, scored.correct, batch.response_ids, batch.logprobs,
                            batch.entropy_sum)
    return compute_advantages(samples, cfg.algorithm)


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

    def draw(self, run: Run, step: int) -> tuple[list, dict]:
        return self.pipeline.prompts(step)  # with max_staleness 1 they may have been drawn a step ahead

    def run(self, run: Run, step: int, rows: list[dict]) -> dict:
        cfg, G = self.cfg, self.cfg.rollout.group_size
        t0 = time.perf_counter()
        batch, staleness = self.pipeline.rollout(step, rows)
        self.pipeline.start_next(step + 1)  # max_staleness 1: the next rollout runs while this step trains
        t1 = time.perf_counter()
        scored = run.score(rows, batch, G)
        adv, algo_stats = advantages(cfg, scored, batch, [G] * len(rows))
        t2 = time.perf_counter()
        return self.update(run, step, rows, batch, scored, adv, algo_stats, staleness,
                           time_generate=t1 - t0, time_reward=t2 - t1)

    def update(self, run: Run, step: int, rows: list[dict], batch: RolloutBatch, scored: ScoredBatch,
               advantages: torch.Tensor, algo_stats: dict, staleness: int = 0, train: bool = True,
               **times: float) -> dict:
        """Train on one scored rollout batch, bring the rollout workers to the new weights, and return the step's
        metrics row (`algo_stats` and `times` go into it as they are). Shared with rl/steps/adaptive.py, whose
        `train=False` (no group varied) logs the batch without an update."""
        cfg = self.cfg
        t2 = time.perf_counter()
        keep = range(len(batch))
        if cfg.algorithm.overlong_filter:
            # DAPO's overlong filtering (Yu et al. 2025, section 3.4): a truncated response is not known to be
            # wrong, only unfinished, so its reward is noise; it leaves the loss and its denominators entirely
            # (its reward still entered its group's baseline above).
            keep = [i for i, why in enumerate(batch.finish_reason) if why != "length"]
            algo_stats["overlong_filtered"] = len(batch) - len(keep)
        sequences = [TrainSequence(batch.prompt_ids[i], batch.response_ids[i], batch.logprobs[i],
                                   float(advantages[i])) for i in keep] if train else []
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

        log_rollout_events(run, step, rows, batch, scored)
        row = {"loss": stats["loss"], **rollout_metrics(batch, scored),
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
