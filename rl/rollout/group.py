"""The driver's handle on the rollout workers (one Ray actor each, rl/rollout/worker.py or vllm_worker.py)."""
from __future__ import annotations

import ray

from rl.cluster.placement import Placement
from rl.cluster.session import own_placement, role_threads, shutdown
from rl.cluster.watchdog import call_all
from rl.config.schema import Config
from rl.contracts import RolloutBatch
from rl.learner.batch import split_bounds
from rl.rollout.worker import RolloutWorker, SamplingParams
from rl.seeds import derive_seed


class RolloutGroup:
    """The rollout workers. They only generate: which weights they must hold, and how a recreated one gets them
    back, is rl.sync.owner.WeightSync's business (passed to `generate` as `weights`)."""

    def __init__(self, cfg: Config, model_path: str, placement: Placement | None = None):
        n = cfg.rollout.num_workers
        placement = own_placement(self, cfg, "rollout", placement)
        device = "cuda" if cfg.rollout.num_gpus > 0 else "cpu"
        if cfg.rollout.backend == "vllm":
            from rl.rollout.vllm_worker import VllmRolloutWorker  # vllm is an optional extra, imported only when chosen
            from rl.rollout.vllm_support import engine_args

            actor, engine = ray.remote(VllmRolloutWorker), engine_args(cfg)
            args = [(model_path, cfg.model.dtype, engine, i, cfg.rollout.vllm_sleep) for i in range(n)]
        else:
            actor = ray.remote(RolloutWorker)
            args = [(model_path, cfg.model.dtype, role_threads(n, cfg), device, cfg.rollout.backend,
                     cfg.rollout.speculative.model_dump())] * n
        # Ray recreates a dead worker (max_restarts); call_all re-issues its unfinished request after the weights
        # owner gave it the current weights back (it restarts with the initial ones).
        self.workers = [actor.options(**placement.options("rollout", i), max_restarts=cfg.placement.max_restarts,
                                      max_task_retries=0).remote(*args[i]) for i in range(n)]
        self.max_restarts, self.watchdog = cfg.placement.max_restarts, cfg.trainer.watchdog_seconds
        if cfg.rollout.num_gpus > 0:
            # On a GPU an engine sizes its memory when it starts (vLLM: gpu_memory_utilization of the device, KV
            # cache included, checked against what is free then). The learner, started next (rl.trainer), must find
            # that memory taken instead of racing the engines for it, so the group returns once every worker is up.
            startup = None if self.watchdog is None else max(self.watchdog, 1800.0)
            try:
                call_all("rollout", "ping", [(w, ()) for w in self.workers], startup)
            except Exception:
                shutdown(self)  # the caller never gets a handle to clean up
                raise

    def generate(self, prompts: list[str], params: SamplingParams, seed: int, weights=None) -> RolloutBatch:
        """Prompts are split over workers in contiguous chunks; groups stay whole and in order.

        weights: the run's rl.sync.owner.WeightSync (every worker must hold its `version`, a recreated one is refilled
        by its `restore`); None where nothing was ever synced (a standalone eval)."""
        version = weights.version if weights is not None else 0
        restore = weights.restore if weights is not None else None
        chunks = [prompts[a:b] for a, b in split_bounds(len(prompts), len(self.workers))]
        calls = [(w, (c, params, derive_seed(seed, "worker", index=i), version))
                 for i, (w, c) in enumerate(zip(self.workers, chunks)) if c]
        return RolloutBatch.concat(call_all("rollout", "generate", calls, self.watchdog, self.max_restarts, restore))

    def nodes(self) -> list[dict]:
        return ray.get([w.ping.remote() for w in self.workers])
