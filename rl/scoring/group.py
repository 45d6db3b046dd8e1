"""The driver's handle on the reward workers (one Ray actor each, rl/scoring/worker.py)."""
from __future__ import annotations

import ray

from rewards.isolation import RewardResult, merge_results
from rl.cluster.placement import Placement
from rl.cluster.session import own_placement, role_threads, shutdown
from rl.cluster.watchdog import call_all
from rl.config.schema import Config
from rl.learner.batch import split_bounds
from rl.scoring.worker import RewardWorker


class RewardGroup:
    def __init__(self, cfg: Config, placement: Placement | None = None):
        functions = [f.model_dump() for f in cfg.reward.functions]
        placement = own_placement(self, cfg, "reward", placement)
        actor = ray.remote(RewardWorker)
        self.workers = [actor.options(**placement.options("reward", i), max_restarts=cfg.placement.max_restarts,
                                      max_task_retries=0).remote(functions, cfg.reward.timeout_seconds)
                        for i in range(cfg.reward.num_workers)]
        self.max_restarts, self.watchdog = cfg.placement.max_restarts, cfg.trainer.watchdog_seconds

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list],
              group_size: int | list[int] = 1) -> RewardResult:
        """Samples are split over workers in whole groups: group-relative rewards (length penalties) see every
        sample of a prompt. group_size: one size for every group, or the list of the groups' sizes in order
        (Rollout-GDRO's variable groups), which must add up to the samples."""
        n = len(completions)
        if not isinstance(group_size, int):
            from rl.algo.groups import check_sizes, worker_bounds

            bounds = worker_bounds(check_sizes(group_size, n), len(self.workers))
        elif n % group_size:
            raise ValueError(f"{n} samples are not whole groups of {group_size}")
        else:
            bounds = [(a * group_size, b * group_size) for a, b in split_bounds(n // group_size, len(self.workers))]
        calls = [(w, (prompts[a:b], completions[a:b], {k: v[a:b] for k, v in columns.items()}))
                 for w, (a, b) in zip(self.workers, bounds) if b > a]
        # A reward worker Ray recreated gets its chunk again (rewards are stateless); a hung one trips the watchdog.
        parts = call_all("reward", "score", calls, self.watchdog, self.max_restarts)
        return merge_results([RewardResult(**part) for part in parts])

    def nodes(self) -> list[dict]:
        return ray.get([w.ping.remote() for w in self.workers])
