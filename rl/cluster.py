"""Ray plumbing: start/join the cluster and drive the three actor groups (rollout, reward, learner).

Everything Ray-specific the driver needs is here, so rl/trainer.py reads as the algorithm's loop.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import ray

from rewards.isolation import RewardResult
from rl.batch import split_bounds
from rl.config import Config
from rl.learner import LearnerRank
from rl.reward_worker import RewardWorker
from rl.rollout import RolloutWorker, SamplingParams

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
# Passed to every actor; HF_* offline flags are forwarded so a run that is offline stays offline in its workers.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "REASONRL_CACHE",
                 "TORCH_EXTENSIONS_DIR")


def init_ray(cfg: Config) -> None:
    # Explicit, so a token file left in ~/.ray by another cluster cannot flip authentication on us.
    os.environ["RAY_AUTH_MODE"] = cfg.ray.auth_mode
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["RAY_AUTH_MODE"] = cfg.ray.auth_mode
    kwargs = dict(runtime_env={"env_vars": env}, log_to_driver=True, configure_logging=False)
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=False,
                 dashboard_host="127.0.0.1", **kwargs)


def _threads(share: int) -> int:
    # Rollout, reward and learner phases do not overlap in the synchronous loop, so each role may use all cores.
    return max(1, (os.cpu_count() or 1) // share)


def _options(num_gpus: float) -> dict:
    # CPU actors reserve no logical CPU: their threads are set explicitly, and a 2-core laptop must still fit a
    # rollout worker, a reward worker and two learner ranks.
    accel = "cuda" if num_gpus > 0 else "cpu"
    return dict(num_cpus=0, num_gpus=num_gpus, runtime_env={"env_vars": {"DS_ACCELERATOR": accel}})


class RolloutGroup:
    def __init__(self, cfg: Config, model_path: str):
        n = cfg.rollout.num_workers
        actor = ray.remote(RolloutWorker).options(**_options(cfg.rollout.num_gpus), max_restarts=0)
        device = "cuda" if cfg.rollout.num_gpus > 0 else "cpu"
        self.workers = [actor.remote(model_path, cfg.model.dtype, _threads(n), device) for _ in range(n)]

    def generate(self, prompts: list[str], params: SamplingParams, seed: int) -> dict:
        """Prompts are split over workers in contiguous chunks; groups stay whole and in order."""
        chunks = [prompts[a:b] for a, b in split_bounds(len(prompts), len(self.workers))]
        futures = [w.generate.remote(c, params, seed * 1000 + i) for i, (w, c) in enumerate(zip(self.workers, chunks))
                   if c]
        return _concat(ray.get(futures))

    def load_weights(self, weights_ref, version: int) -> None:
        ray.get([w.load_weights.remote(weights_ref, version) for w in self.workers])

    def nodes(self) -> list[dict]:
        return ray.get([w.ping.remote() for w in self.workers])


class RewardGroup:
    def __init__(self, cfg: Config):
        functions = [f.model_dump() for f in cfg.reward.functions]
        actor = ray.remote(RewardWorker).options(num_cpus=0)
        self.workers = [actor.remote(functions, cfg.reward.timeout_seconds) for _ in range(cfg.reward.num_workers)]

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> RewardResult:
        n = len(completions)
        bounds = split_bounds(n, len(self.workers))
        futures = [w.score.remote(prompts[a:b], completions[a:b], {k: v[a:b] for k, v in columns.items()})
                   for w, (a, b) in zip(self.workers, bounds) if b > a]
        merged = RewardResult()
        for part in ray.get(futures):
            for name, vals in part["scores"].items():
                merged.scores.setdefault(name, []).extend(vals)
            for key in ("failures", "timeouts", "nones", "seconds"):
                totals = getattr(merged, key)
                for name, v in part[key].items():
                    totals[name] = totals.get(name, 0) + v
            merged.errors.extend(part["errors"])
        return merged

    def nodes(self) -> list[dict]:
        return ray.get([w.ping.remote() for w in self.workers])


class LearnerGroup:
    def __init__(self, cfg: Config, model_path: str):
        n = cfg.learner.num_ranks
        actor = ray.remote(LearnerRank).options(**_options(cfg.learner.num_gpus_per_rank), max_restarts=0)
        self.ranks = [actor.remote(r, n, model_path, cfg.learner.model_dump(), cfg.algorithm.model_dump(),
                                   cfg.model.dtype, cfg.rollout.temperature, cfg.trainer.seed, _threads(n))
                      for r in range(n)]
        try:
            addr, port = ray.get(self.ranks[0].address.remote())
            ray.get([r.setup.remote(addr, port) for r in self.ranks])
        except Exception:
            shutdown(self)  # the caller never gets a handle to clean up
            raise
        self.micro_batch_size = cfg.learner.micro_batch_size

    def train(self, sequences: list[dict], mini_batches: int, max_len: int) -> dict:
        """Shard a step's sequences over ranks and run the update; returns summed statistics."""
        n_ranks = len(self.ranks)
        plan = {"num_tokens": [], "num_seqs": [], "num_micro": [], "max_len": max_len}
        shards: list[list[dict]] = [[] for _ in range(n_ranks)]
        for mb, (a, b) in enumerate(split_bounds(len(sequences), mini_batches)):
            part = sequences[a:b]
            plan["num_tokens"].append(max(1, sum(len(s["response_ids"]) for s in part)))
            plan["num_seqs"].append(len(part))
            per_rank = [part[x:y] for x, y in split_bounds(len(part), n_ranks)]
            plan["num_micro"].append(max(1, max(math.ceil(len(p) / self.micro_batch_size) for p in per_rank)))
            for r, p in enumerate(per_rank):
                shards[r].extend(dict(s, mini_batch=mb) for s in p)
        stats = ray.get([rank.train.remote(shard, plan) for rank, shard in zip(self.ranks, shards)])
        total = {k: sum(s[k] for s in stats) for k in stats[0] if k not in ("lr", "grad_norm", "optimizer_steps")}
        total["grad_norm"] = stats[0]["grad_norm"] / max(1, stats[0]["optimizer_steps"])  # global norm, same on all
        total["lr"] = stats[0]["lr"]
        total["loss"] /= max(1, stats[0]["optimizer_steps"])
        return total

    def weights(self):
        """ObjectRef of rank 0's numpy state dict (all ranks take part: ZeRO-3 gathers are collective)."""
        refs = [r.get_weights.remote() for r in self.ranks]
        ray.get(refs[1:])  # raises if another rank failed; they return None
        return refs[0]

    def logprobs(self, prompt_ids, response_ids):
        return ray.get([r.logprobs.remote(prompt_ids, response_ids) for r in self.ranks])[0]

    def save(self, path: str) -> None:
        ray.get([r.save_checkpoint.remote(path) for r in self.ranks])

    def load(self, path: str) -> None:
        ray.get([r.load_checkpoint.remote(path) for r in self.ranks])

    def nodes(self) -> list[dict]:
        return ray.get([r.ping.remote() for r in self.ranks])


def shutdown(*groups) -> None:
    for group in groups:
        for actor in getattr(group, "workers", []) + getattr(group, "ranks", []):
            ray.kill(actor, no_restart=True)


def _concat(parts: list[dict]) -> dict:
    out: dict = {}
    for part in parts:
        for k, v in part.items():
            out.setdefault(k, []).extend(v)
    return out
