"""Ray plumbing: start/join the cluster and drive the three actor groups (rollout, reward, learner).

Everything Ray-specific the driver needs is here, so rl/trainer.py reads as the algorithm's loop.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import ray

from rewards.isolation import RewardResult
from rl.batch import split_bounds
from rl.config import Config
from rl import updates
from rl.contracts import PreferencePair, RolloutBatch, TrainSequence
from rl.learner import LearnerRank
from rl.placement import Placement
from rl.ray_auth import apply_auth_mode, new_local_token, resolve_auth_mode
from rl.reward_worker import RewardWorker
from rl.rollout import RolloutWorker, SamplingParams
from rl.watchdog import call_all

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
# Passed to every actor; HF_* offline flags are forwarded so a run that is offline stays offline in its workers.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "REASONRL_CACHE",
                 "TORCH_EXTENSIONS_DIR", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")


_AUTH_IN_USE: list[str] = []  # the mode this process's Ray connection was made with


def init_ray(cfg: Config) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        if _AUTH_IN_USE:  # a job client for another cluster (launch.submit) may have switched the mode since
            apply_auth_mode(_AUTH_IN_USE[-1])
        return
    address = cfg.ray.address
    if not address and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        address = "auto"  # the driver of a submitted job (reasonrl submit) joins the cluster that runs it
    # Explicit, so a token file left in ~/.ray by another cluster cannot flip authentication on us. A cluster we
    # start gets token authentication: its GCS, raylets, workers and agents listen on every interface (Ray binds
    # them so; `_node_ip_address="127.0.0.1"` is turned back into the routable address by ray.init), and without a
    # token anyone who reaches a port may run code in them.
    auth_mode = resolve_auth_mode(cfg.ray.auth_mode, local=not address)
    if not address and auth_mode == "token":
        new_local_token()
    apply_auth_mode(auth_mode)
    _AUTH_IN_USE[:] = [auth_mode]
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # Ray forwards every actor's output to the driver's console, where library progress bars ("Loading weights",
    # "Writing model shards": transformers and the hub read this variable) would break up the run's own bar.
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not (cfg.rollout.num_gpus or cfg.learner.num_gpus_per_rank):
        # No role has a GPU: any process of the run that imports DeepSpeed is told so, instead of probing for an
        # accelerator and warning that it found none (each role's actors also get theirs from rl.placement).
        env.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["RAY_AUTH_MODE"] = auth_mode  # the mode only; the token is inherited from the raylet, never sent along
    # A job submitted with `reasonrl submit` already has a runtime_env (working_dir, env_vars); ours is merged
    # into it, ours winning on the keys both set (they carry the same values).
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    # Every worker registers a faulthandler stack dump on SIGUSR1, used by the watchdog when py-spy cannot attach.
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "rl.watchdog.setup_worker"}
    kwargs = dict(runtime_env=runtime_env, log_to_driver=True, configure_logging=False)
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
    """The rollout workers. They only generate: which weights they must hold, and how a recreated one gets them
    back, is rl.weights.WeightSync's business (passed to `generate` as `weights`)."""

    def __init__(self, cfg: Config, model_path: str, placement: Placement | None = None):
        n = cfg.rollout.num_workers
        placement = _own_placement(self, cfg, "rollout", placement)
        device = "cuda" if cfg.rollout.num_gpus > 0 else "cpu"
        if cfg.rollout.backend == "vllm":
            from rl.rollout_vllm import VllmRolloutWorker  # vllm is an optional extra, imported only when chosen
            from rl.vllm_support import engine_args

            actor, engine = ray.remote(VllmRolloutWorker), engine_args(cfg)
            args = [(model_path, cfg.model.dtype, engine, i, cfg.rollout.vllm_sleep) for i in range(n)]
        else:
            actor = ray.remote(RolloutWorker)
            args = [(model_path, cfg.model.dtype, _threads(n, cfg), device, cfg.rollout.backend)] * n
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

        weights: the run's rl.weights.WeightSync (every worker must hold its `version`, a recreated one is refilled
        by its `restore`); None where nothing was ever synced (a standalone eval)."""
        version = weights.version if weights is not None else 0
        restore = weights.restore if weights is not None else None
        chunks = [prompts[a:b] for a, b in split_bounds(len(prompts), len(self.workers))]
        calls = [(w, (c, params, seed * 1000 + i, version)) for i, (w, c) in enumerate(zip(self.workers, chunks))
                 if c]
        return RolloutBatch.concat(call_all("rollout", "generate", calls, self.watchdog, self.max_restarts, restore))

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
              group_size: int | list[int] = 1) -> RewardResult:
        """Samples are split over workers in whole groups: group-relative rewards (length penalties) see every
        sample of a prompt. group_size: one size for every group, or the list of the groups' sizes in order
        (Rollout-GDRO's variable groups), which must add up to the samples."""
        n = len(completions)
        if not isinstance(group_size, int):
            from rl.groups import check_sizes, worker_bounds

            bounds = worker_bounds(check_sizes(group_size, n), len(self.workers))
        elif n % group_size:
            raise ValueError(f"{n} samples are not whole groups of {group_size}")
        else:
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
            cfg.rollout.temperature, cfg.trainer.seed, _threads(n, cfg), cfg.rollout.top_k, cfg.rollout.top_p)
            for r in range(n)]
        self.watchdog = cfg.trainer.watchdog_seconds
        try:
            # All ranks on one node: their group's rendezvous listens on loopback only.
            nodes = {r["node"] for r in ray.get([rank.ping.remote() for rank in self.ranks])}
            addr, port = ray.get(self.ranks[0].address.remote(loopback=len(nodes) == 1))
            # Start-up may JIT-build DeepSpeed ops and load the model: it gets at least DeepSpeed's own 30 min.
            startup = None if self.watchdog is None else max(self.watchdog, 1800.0)
            call_all("learner", "setup", [(r, (addr, port)) for r in self.ranks], startup)
        except Exception:
            shutdown(self)  # the caller never gets a handle to clean up
            raise
        self.micro_batch_size = cfg.learner.micro_batch_size

    def update(self, name: str, items: list, plan_fn, reduce_fn=None):
        """Run the rl.updates update `name` on `items` over all ranks, the generic path of every algorithm.

        plan_fn(items, num_ranks, micro_batch_size) -> (one shard per rank, plan); every rank gets its shard and
        the same plan. reduce_fn(per-rank results) -> the return value (default: the list of results)."""
        return self._dispatch("update", name, items, plan_fn, reduce_fn)

    def query(self, name: str, items: list, plan_fn, reduce_fn=None):
        """As `update`, for the no-grad rl.updates query `name`."""
        return self._dispatch("query", name, items, plan_fn, reduce_fn)

    def _dispatch(self, method: str, name: str, items: list, plan_fn, reduce_fn):
        shards, plan = plan_fn(items, len(self.ranks), self.micro_batch_size)
        if len(shards) != len(self.ranks):  # a rank left out would hang the others in their ZeRO collectives
            raise ValueError(f"{name}: plan gave {len(shards)} shards for {len(self.ranks)} learner ranks")
        results = call_all("learner", method, [(r, (name, s, plan)) for r, s in zip(self.ranks, shards)],
                           self.watchdog)
        return results if reduce_fn is None else reduce_fn(results)

    def train(self, sequences: list[TrainSequence], mini_batches: int, max_len: int, on_policy: bool = True) -> dict:
        """Shard a step's sequences over ranks and run the policy-gradient update; returns summed statistics.

        on_policy: the sequences were sampled from the current weights (their old log-probs are then recomputed
        exactly by the learner's own forward when there is one pass and one mini-batch)."""
        plan = partial(updates.plan_policy, mini_batches=mini_batches, max_len=max_len, on_policy=on_policy)
        return self.update("policy", sequences, plan, updates.reduce_policy)

    def weights(self):
        """ObjectRef of rank 0's numpy state dict (all ranks take part: ZeRO-3 gathers are collective)."""
        refs = [r.get_weights.remote() for r in self.ranks]
        ray.get(refs[1:])  # raises if another rank failed; they return None
        return refs[0]

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Policy log-probs of given responses; every rank runs the forward (ZeRO-3 gathers), rank 0 answers."""
        return self.query("logprobs", list(zip(prompt_ids, response_ids)), updates.replicate, updates.first)

    def train_preference(self, pairs: list[PreferencePair]) -> dict:
        """One optimizer step on TODO/DPO pairs; returns batch means (loss, margin, rewards, train accuracies)."""
        return self.update("preference", pairs, updates.plan_pairs, updates.reduce_preference)

    def preference_logps(self, pairs: list[PreferencePair]) -> list[list[float]]:
        """[policy_chosen, policy_rejected, ref_chosen, ref_rejected] per pair, in order, computed over all ranks."""
        return self.query("preference_logps", pairs, updates.plan_pairs, updates.concat)

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
