"""Ray plumbing shared by the roles: start or join the cluster, each role's thread share and placement, shutdown.

The three actor groups the driver calls live with their roles: rl/rollout/group.py, rl/scoring/group.py,
rl/learner/group.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import ray

from rl.config.schema import Config
from rl.cluster.placement import Placement
from rl.cluster.auth import apply_auth_mode, new_local_token, resolve_auth_mode

PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
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
        # accelerator and warning that it found none (each role's actors also get theirs from rl.cluster.placement).
        env.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["RAY_AUTH_MODE"] = auth_mode  # the mode only; the token is inherited from the raylet, never sent along
    # A job submitted with `reasonrl submit` already has a runtime_env (working_dir, env_vars); ours is merged
    # into it, ours winning on the keys both set (they carry the same values).
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    # Every worker registers a faulthandler stack dump on SIGUSR1, used by the watchdog when py-spy cannot attach.
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "rl.cluster.watchdog.setup_worker"}
    kwargs = dict(runtime_env=runtime_env, log_to_driver=True, configure_logging=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # No prestarted workers: with a job runtime_env Ray starts num_cpus idle Python workers that no actor of
        # ours takes (each ~80 MB RSS); actors still start as fast without them.
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=False,
                 dashboard_host="127.0.0.1", _system_config={"prestart_worker_first_driver": False}, **kwargs)


def role_threads(share: int, cfg: Config) -> int:
    # Rollout, reward and learner phases do not overlap in the synchronous loop, so each role may use all cores;
    # one step off-policy (trainer.max_staleness 1) runs rollout and learner at once, so they split the cores.
    overlap = 2 if cfg.trainer.max_staleness else 1
    return max(1, (os.cpu_count() or 1) // (share * overlap))


def own_placement(group, cfg: Config, role: str, placement: Placement | None) -> Placement:
    # A group built on its own (tests, tools) reserves its role's placement itself and frees it in shutdown().
    group.owns_placement = placement is None
    group.placement = placement or Placement(cfg, (role,))
    return group.placement


def shutdown(*groups) -> None:
    for group in groups:
        for actor in getattr(group, "workers", []) + getattr(group, "ranks", []):
            ray.kill(actor, no_restart=True)
        if getattr(group, "owns_placement", False):
            group.placement.remove()
