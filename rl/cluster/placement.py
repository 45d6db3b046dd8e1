"""Where actors run: per-role resources and Ray placement groups (the `placement` config section).

Each role (rollout, reward, learner) gets one bundle per actor: {CPU: num_cpus, GPU: the role's GPUs, **custom
resources}. A role whose bundle is empty is scheduled as on one machine (no placement group: Ray cannot reserve an
empty bundle, and a 2-core laptop must fit every role). Otherwise the role's actors are placed with one placement
group (PACK/SPREAD/STRICT_*), so e.g. {node_b: 0.01} pins rollout workers to the node started with
`--resources '{"node_b": 1}'`. With `colocate`, rollout worker i joins learner rank i % num_ranks's bundle, which
then also holds the rollout worker's resources (same node, same devices).
"""
from __future__ import annotations

import logging

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.config.schema import Config, ConfigError
from rl.config.gpu import cluster_gpu_problem, gpus_needed

log = logging.getLogger("reasonrl")
ROLES = ("rollout", "reward", "learner")
READY_TIMEOUT_S = 120.0  # a placement group not ready by then cannot be placed: say so instead of waiting forever


def role_shape(cfg: Config, role: str) -> tuple[int, float]:
    """(number of actors, GPUs per actor) of a role, from the role's own config section."""
    if role == "rollout":
        return cfg.rollout.num_workers, cfg.rollout.num_gpus
    if role == "reward":
        return cfg.reward.num_workers, 0.0
    if role == "learner":
        return cfg.learner.num_ranks, cfg.learner.num_gpus_per_rank
    raise ValueError(f"unknown role {role!r}")


def bundle(cfg: Config, role: str) -> dict[str, float]:
    """The resources one actor of `role` reserves (zeros left out)."""
    spec = getattr(cfg.placement, role)
    _, gpus = role_shape(cfg, role)
    out = {"CPU": float(spec.num_cpus), "GPU": float(gpus), **{k: float(v) for k, v in spec.resources.items()}}
    return {k: v for k, v in out.items() if v > 0}


def _merge(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {*a, *b}}


def colocated(cfg: Config, roles: tuple[str, ...]) -> bool:
    return cfg.placement.colocate and "rollout" in roles and "learner" in roles


def reservations(cfg: Config, roles: tuple[str, ...] = ROLES) -> dict[str, dict[str, float]]:
    """role -> the bundle each of its actors reserves in the role's placement group, for the roles that get one
    (an empty bundle gets none; a colocated rollout worker rides in its learner rank's bundle, which then holds
    both). Pure: what `Placement` reserves and what `reasonrl train --dry-run` prints."""
    together = colocated(cfg, roles)
    out = {}
    for role in roles:
        if role == "rollout" and together:
            continue  # rides in the learner's bundles
        shape = bundle(cfg, role)
        if role == "learner" and together:
            shape = _merge(shape, bundle(cfg, "rollout"))
        if shape:
            out[role] = shape
    return out


class Placement:
    """Placement groups for some roles of one run; `options(role, i)` are the Ray actor options of actor i."""

    def __init__(self, cfg: Config, roles: tuple[str, ...] = ROLES):
        self.cfg, self.roles = cfg, roles
        self.groups: dict[str, object] = {}
        self.colocated = colocated(cfg, roles)
        if gpus_needed(cfg, roles):  # before anything is reserved: too few GPUs is a config error, not a timeout
            problem = cluster_gpu_problem(cfg, roles, float(ray.cluster_resources().get("GPU", 0.0)))
            if problem:
                key, _, why = problem.partition(": ")
                raise ConfigError(f"config key '{key}': {why}")
        try:
            for role, shape in reservations(cfg, roles).items():
                self.groups[role] = self._reserve(role, shape)
        except Exception:
            self.remove()
            raise

    def _reserve(self, role: str, shape: dict[str, float]):
        n, _ = role_shape(self.cfg, role)
        strategy = getattr(self.cfg.placement, role).strategy
        pg = placement_group([dict(shape) for _ in range(n)], strategy=strategy, name=f"reasonrl-{role}")
        self.groups[role] = pg  # so remove() also frees one that never became ready
        try:
            ray.get(pg.ready(), timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            available = {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
            raise ConfigError(f"config key 'placement.{role}': cannot place {n} x {shape} with {strategy} on this "
                              f"cluster (its resources: {available})") from None
        return pg

    def options(self, role: str, index: int) -> dict:
        """Actor options for actor `index` of `role`: resources, and the bundle it is scheduled into."""
        _, gpus = role_shape(self.cfg, role)
        spec = getattr(self.cfg.placement, role)
        accel = "cuda" if gpus > 0 else "cpu"
        opts = dict(num_cpus=spec.num_cpus, num_gpus=gpus, runtime_env={"env_vars": {"DS_ACCELERATOR": accel}})
        if spec.resources:
            opts["resources"] = dict(spec.resources)
        home = "learner" if role == "rollout" and self.colocated else role
        pg = self.groups.get(home)
        if pg is not None:
            n_home, _ = role_shape(self.cfg, home)
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=index % n_home, placement_group_capture_child_tasks=False)
        return opts

    def remove(self) -> None:
        for pg in self.groups.values():
            try:
                remove_placement_group(pg)
            except Exception as err:  # the cluster may already be gone; nothing left to free then
                log.debug("placement group removal failed: %s", err)
        self.groups.clear()


def node_map() -> dict[str, dict]:
    """Node id -> {ip, custom resources} of every live node: what the actor map in events.jsonl refers to."""
    out = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        custom = {k: v for k, v in node.get("Resources", {}).items()
                  if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:")
                  and not k.startswith("accelerator_type:")}
        out[node["NodeID"]] = {"ip": node.get("NodeManagerAddress"), "resources": custom}
    return out
