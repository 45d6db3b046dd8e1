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
from rl.placement import Placement
from rl.reward_worker import RewardWorker
from rl.rollout import RolloutWorker, SamplingParams
from rl.watchdog import call_all

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
    # A job submitted with `reasonrl submit` already has a runtime_env (working_dir, env_vars); ours is merged
    # into it, ours winning on the keys both set (they carry the same values).
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    # Every worker registers a faulthandler stack dump on SIGUSR1, used by the watchdog when py-spy cannot attach.
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "rl.watchdog.setup_worker"}
    kwargs = dict(runtime_env=runtime_env, log_to_driver=True, configure_logging=False)
    address = cfg.ray.address
    if not address and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        address = "auto"  # the driver of a submitted job (reasonrl submit) joins the cluster that runs it
    if address:
        ray.init(address=address, **kwargs)
    else:
        # No prestarted workers: with a job runtime_env Ray starts num_cpus idle Python workers that no actor of
        # ours takes (each ~80 MB RSS); actors still start as fast without them.
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=False,
                 dashboard_host="127.0.0.1", _system_config={"prestart_worker_first_driver": False}, **kwargs)


def _threads(share: int, cfg: Config) -> int:
    # Rollout, reward and learner phases do not overlap in the synchronous loop, so each role may use all cores;
    # one step off-policy (trainer.max_staleness 1) runs rollout and learner at once, so they split the cores.
    overlap = 2 if cfg.trainer.max_staleness else 1
    return max(1, (os.cpu_count() or 1) // (share * overlap))


def _own_placement(group, cfg: Config, role: str, placement: Placement | None) -> Placement:
    # A group built on its own (tests, tools) reserves its role's placement itself and frees it in shutdown().
    group.owns_placement = placement is None
    group.placement = placement or Placement(cfg, (role,))
    return group.placement


class RolloutGroup:
    def __init__(self, cfg: Config, model_path: str, placement: Placement | None = None):
        n = cfg.rollout.num_workers
        placement = _own_placement(self, cfg, "rollout", placement)
        # Ray recreates a dead worker (max_restarts); its unfinished request is re-issued by call_all after the
        # worker got the current weights back (it restarts with the initial ones).
        device = "cuda" if cfg.rollout.num_gpus > 0 else "cpu"
        if cfg.rollout.backend == "vllm":
            from rl.rollout_vllm import VllmRolloutWorker

            actor, args = ray.remote(VllmRolloutWorker), (model_path, cfg.model.dtype, cfg.rollout.vllm)
        else:
            actor, args = ray.remote(RolloutWorker), (model_path, cfg.model.dtype, _threads(n, cfg), device,
                                                      cfg.rollout.backend)
        self.workers = [actor.options(**placement.options("rollout", i), max_restarts=cfg.placement.max_restarts,
                                      max_task_retries=0).remote(*args) for i in range(n)]
        self.cfg, self.max_restarts, self.watchdog = cfg, cfg.placement.max_restarts, cfg.trainer.watchdog_seconds
        # Object-store sync: a callable returning the last synced weights (an ObjectRef) for a restarted worker.
        self.weights_source = None
        self.resync = None  # set by rl.weight_sync.CollectiveSync: how a restarted worker gets current weights
        self.restarted = False
        self.collective = None
        self.version = 0  # weights version of the last sync: what every worker must hold when it generates

    def generate(self, prompts: list[str], params: SamplingParams, seed: int) -> dict:
        """Prompts are split over workers in contiguous chunks; groups stay whole and in order."""
        chunks = [prompts[a:b] for a, b in split_bounds(len(prompts), len(self.workers))]
        calls = [(w, (c, params, seed * 1000 + i, self.version)) for i, (w, c) in enumerate(zip(self.workers, chunks))
                 if c]
        return _concat(call_all("rollout", "generate", calls, self.watchdog, self.max_restarts, self._restarted))

    def _restarted(self, worker) -> None:
        self.restarted = True
        if self.resync is not None:
            self.resync(worker)
        elif self.weights_source is not None:
            ray.get(worker.load_weights.remote(self.weights_source(), self.version))

    def load_weights(self, weights_ref, version: int, source=None) -> None:
        """`source`: how a restarted worker gets these weights later (default: this ref, kept alive)."""
        self.weights_source = source or (lambda: weights_ref)
        call_all("rollout", "load_weights", [(w, (weights_ref, version)) for w in self.workers], self.watchdog,
                 self.max_restarts)
        self.version = version

    def sync_weights(self, learner: "LearnerGroup", version: int) -> None:
        """The learner's current weights into every worker, by the configured `weight_sync.mode`."""
        if self.cfg.weight_sync.mode == "object_store":
            # On-policy, every sync ends a step, so whenever a worker generates the learner holds exactly the synced
            # weights and a restarted worker can fetch them from it again: keeping the ref would pin a second copy
            # of the weights (0.54 GB for 135M in fp32) in the object store through every train phase. One step
            # off-policy the learner trains while the workers generate, so the synced version must be kept.
            self.load_weights(learner.weights(), version,
                              source=None if self.cfg.trainer.max_staleness else learner.weights)
            return
        if self.collective is None:
            from rl.weight_sync import CollectiveSync

            self.collective = CollectiveSync(self.cfg, self, learner)
        self.collective.push(version)
        self.version = version

    def nodes(self) -> list[dict]:
        return ray.get([w.ping.remote() for w in self.workers])


class RewardGroup:
    def __init__(self, cfg: Config, placement: Placement | None = None):
        functions = [f.model_dump() for f in cfg.reward.functions]
        placement = _own_placement(self, cfg, "reward", placement)
        actor = ray.remote(RewardWorker)
        self.workers = [actor.options(**placement.options("reward", i), max_restarts=cfg.placement.max_restarts,
                                      max_task_retries=0).remote(functions, cfg.reward.timeout_seconds)
                        for i in range(cfg.reward.num_workers)]
        self.max_restarts, self.watchdog = cfg.placement.max_restarts, cfg.trainer.watchdog_seconds

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list],
              group_size: int = 1) -> RewardResult:
        """Samples are split over workers in whole groups: group-relative rewards (length penalties) see every
        sample of a prompt."""
        n = len(completions)
        if n % group_size:
            raise ValueError(f"{n} samples are not whole groups of {group_size}")
        bounds = [(a * group_size, b * group_size) for a, b in split_bounds(n // group_size, len(self.workers))]
        calls = [(w, (prompts[a:b], completions[a:b], {k: v[a:b] for k, v in columns.items()}))
                 for w, (a, b) in zip(self.workers, bounds) if b > a]
        merged = RewardResult()
        # A reward worker Ray recreated gets its chunk again (rewards are stateless); a hung one trips the watchdog.
        for part in call_all("reward", "score", calls, self.watchdog, self.max_restarts):
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
    def __init__(self, cfg: Config, model_path: str, placement: Placement | None = None):
        n = cfg.learner.num_ranks
        placement = _own_placement(self, cfg, "learner", placement)
        # A dead rank is never recreated: its DeepSpeed group is gone. The run stops; --resume continues it.
        actor = ray.remote(LearnerRank)
        self.ranks = [actor.options(**placement.options("learner", r), max_restarts=0).remote(
            r, n, model_path, cfg.learner.model_dump(), cfg.algorithm.model_dump(), cfg.model.dtype,
            cfg.rollout.temperature, cfg.trainer.seed, _threads(n, cfg)) for r in range(n)]
        self.watchdog = cfg.trainer.watchdog_seconds
        try:
            addr, port = ray.get(self.ranks[0].address.remote())
            # Start-up may JIT-build DeepSpeed ops and load the model: it gets at least DeepSpeed's own 30 min.
            startup = None if self.watchdog is None else max(self.watchdog, 1800.0)
            call_all("learner", "setup", [(r, (addr, port)) for r in self.ranks], startup)
        except Exception:
            shutdown(self)  # the caller never gets a handle to clean up
            raise
        self.micro_batch_size = cfg.learner.micro_batch_size

    def train(self, sequences: list[dict], mini_batches: int, max_len: int, on_policy: bool = True) -> dict:
        """Shard a step's sequences over ranks and run the update; returns summed statistics.

        on_policy: the sequences were sampled from the current weights (their old log-probs are then recomputed
        exactly by the learner's own forward when there is one pass and one mini-batch)."""
        n_ranks = len(self.ranks)
        plan = {"num_tokens": [], "num_seqs": [], "num_micro": [], "max_len": max_len, "on_policy": on_policy}
        shards: list[list[dict]] = [[] for _ in range(n_ranks)]
        for mb, (a, b) in enumerate(split_bounds(len(sequences), mini_batches)):
            part = sequences[a:b]
            plan["num_tokens"].append(max(1, sum(len(s["response_ids"]) for s in part)))
            plan["num_seqs"].append(len(part))
            per_rank = [part[x:y] for x, y in split_bounds(len(part), n_ranks)]
            plan["num_micro"].append(max(1, max(math.ceil(len(p) / self.micro_batch_size) for p in per_rank)))
            for r, p in enumerate(per_rank):
                shards[r].extend(dict(s, mini_batch=mb) for s in p)
        stats = call_all("learner", "train", list(zip(self.ranks, [(s, plan) for s in shards])), self.watchdog)
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

    def _pair_shards(self, pairs: list[dict]) -> tuple[list[list[dict]], int]:
        """Contiguous shards of pairs, one per rank (a rank left without pairs gets a zero-weight stand-in), and
        the micro-batch count every rank runs; a micro-batch of pairs holds micro_batch_size sequences."""
        shards = [pairs[a:b] or [dict(pairs[0], weight=0.0, stand_in=True)]
                  for a, b in split_bounds(len(pairs), len(self.ranks))]
        per_micro = max(1, self.micro_batch_size // 2)  # each pair is two sequences (chosen, rejected)
        return shards, max(math.ceil(len(s) / per_micro) for s in shards)

    def train_preference(self, pairs: list[dict]) -> dict:
        """One optimizer step on TODO/DPO pairs; returns batch means (loss, margin, rewards, train accuracies)."""
        shards, num_micro = self._pair_shards(pairs)
        plan = {"num_pairs": len(pairs), "num_micro": num_micro}
        stats = ray.get([r.train_preference.remote(s, plan) for r, s in zip(self.ranks, shards)])
        tot = {k: sum(s[k] for s in stats) for k in stats[0] if k not in ("grad_norm", "lr")}
        n, n_pref = max(1.0, tot["pairs"]), max(1.0, tot["pairs"] - tot["ties"])
        return {"loss": tot["loss"], "margin": tot["mu_sum"] / n, "reward_chosen": tot["chosen_reward_sum"] / n,
                "reward_rejected": tot["rejected_reward_sum"] / n, "train_tobt_acc": tot["tobt_correct"] / n,
                "train_sign_acc": tot["sign_correct"] / n_pref, "pairs": tot["pairs"], "ties": tot["ties"],
                "grad_norm": stats[0]["grad_norm"], "lr": stats[0]["lr"]}

    def preference_logps(self, pairs: list[dict]) -> list[list[float]]:
        """[policy_chosen, policy_rejected, ref_chosen, ref_rejected] per pair, in order, computed over all ranks."""
        shards, num_micro = self._pair_shards(pairs)
        parts = ray.get([r.preference_logps.remote(s, num_micro) for r, s in zip(self.ranks, shards)])
        return [row for s, part in zip(shards, parts) if not s[0].get("stand_in") for row in part]

    def save(self, path: str) -> None:
        call_all("learner", "save_checkpoint", [(r, (path,)) for r in self.ranks], self.watchdog)

    def load(self, path: str) -> None:
        call_all("learner", "load_checkpoint", [(r, (path,)) for r in self.ranks], self.watchdog)

    def nodes(self) -> list[dict]:
        return ray.get([r.ping.remote() for r in self.ranks])


def shutdown(*groups) -> None:
    for group in groups:
        for actor in getattr(group, "workers", []) + getattr(group, "ranks", []):
            ray.kill(actor, no_restart=True)
        if getattr(group, "owns_placement", False):
            group.placement.remove()


def _concat(parts: list[dict]) -> dict:
    out: dict = {}
    for part in parts:
        for k, v in part.items():
            out.setdefault(k, []).extend(v)
    return out
