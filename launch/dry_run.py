"""`reasonrl train CONFIG --dry-run`: the resolved config and the placement plan of a run, without running it.

Nothing starts: no Ray cluster or actor, no model download or conversion, no data loading. What it checks is what can
be checked here: the whole config schema (as a real run), benchmark names, reward specs, which roles the run starts
and what each actor reserves. What depends on the machine the run is meant for (vllm installed, enough GPUs visible,
a hub model in the cache) is reported as a warning, so a GPU recipe can be validated on a laptop; a real run still
fails on those (rl.config.schema.environment_problems).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from rl.config.schema import Config, dump_config, environment_problems
from rl.steps import make_step


def run_roles(cfg: Config) -> tuple[tuple[str, ...], list[str]]:
    """The roles rl.trainer.train would start, in start order, and why each beyond the step's own is there.

    Mirrors the trainer: the step kind's roles, plus rollout + reward for the held-out task accuracy (when the data
    has a held-out split and eval_size > 0), plus rollout for the benchmark eval hook (trainer.eval_every)."""
    from rl.cluster.placement import ROLES
    from rl.data.prompts import eval_source
    from rl.steps import make_step  # torch and transformers, imported: nothing is loaded or started

    wanted, why = set(make_step(cfg).roles), []
    t = cfg.trainer
    if eval_source(cfg) is not None and cfg.data.eval_size and (t.eval_at_start or t.eval_at_end):
        wanted |= {"rollout", "reward"}
        why.append(f"held-out accuracy on {eval_source(cfg)[0]} ({cfg.data.eval_size} problems): rollout + reward")
    if t.eval_every:
        wanted.add("rollout")
        why.append(f"benchmark eval every {t.eval_every} steps on {', '.join(t.eval_benchmarks)} (greedy="
                   f"{t.eval_greedy}, {cfg.rollout.max_new_tokens} tokens): the rollout workers, plus one unplaced "
                   "verifier actor started at the first eval")
    return tuple(r for r in ROLES if r in wanted), why


def placement_plan(cfg: Config, roles: tuple[str, ...]) -> dict:
    """Per role: actors, what each reserves, the placement group (strategy, bundle) or none, colocation."""
    from rl.cluster.placement import colocated, reservations, role_shape

    groups, together = reservations(cfg, roles), colocated(cfg, roles)
    plan = {"colocate": together, "roles": {}}
    for role in roles:
        n, gpus = role_shape(cfg, role)
        spec = getattr(cfg.placement, role)
        entry = {"actors": n, "num_cpus": spec.num_cpus, "num_gpus": gpus, "resources": dict(spec.resources),
                 "strategy": spec.strategy}
        if role == "rollout" and together:
            entry["placement_group"] = f"in the learner's bundles (worker i -> rank i % {cfg.learner.num_ranks})"
        elif role in groups:
            entry["placement_group"] = {"bundles": n, "bundle": groups[role], "strategy": spec.strategy}
        else:
            entry["placement_group"] = None  # nothing to reserve: scheduled as on one machine
        plan["roles"][role] = entry
    plan["total_gpus"] = sum(role_shape(cfg, r)[0] * role_shape(cfg, r)[1] for r in roles)
    plan["total_cpus_reserved"] = sum(role_shape(cfg, r)[0] * getattr(cfg.placement, r).num_cpus for r in roles)
    return plan


def environment_warnings(cfg: Config, plan: dict) -> list[str]:
    """What this machine lacks for the run (a real run fails on the first of them, or later in Ray)."""
    warnings = list(environment_problems(cfg))
    try:
        import torch

        visible = torch.cuda.device_count()
    except Exception:  # a broken CUDA install counts as none
        visible = 0
    need = plan["total_gpus"]
    if need > visible:
        where = "this machine" if not cfg.ray.address else "this machine (the run joins a cluster, which may have them)"
        warnings.append(f"the run needs {need:g} GPU(s) and {where} has {visible}: a real run here would wait for "
                        "resources and fail at placement")
    spec = cfg.model.path
    local = Path(spec).expanduser()
    if ":" not in spec and not local.exists() and (spec.count("/") != 1 or spec.startswith((".", "/", "~"))):
        # Not a hub id (those are exactly org/name, as rl.models.resolve_model reads them): a folder to be made.
        warnings.append(f"model.path {spec!r} does not exist yet: a real run fails unless it is created first "
                        "(e.g. by the SFT run whose checkpoint-final it names)")
    elif spec.count("/") == 1 and not local.exists() and not spec.startswith((".", "/", "~")):
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
        if not cached:
            warnings.append(f"model.path {spec!r} is not in the local hub cache: a real run downloads it first")
    if cfg.rollout.backend == "vllm" and importlib.util.find_spec("vllm") is not None and visible == 0:
        warnings.append("vllm is installed but no GPU is visible: its engine will not start here")
    return warnings


def _data_line(source: str, split: str, limit: int | None) -> str:
    if source == "arith":
        return "arith (generated)"
    if Path(source).suffix.lower() in (".jsonl", ".json", ".parquet"):
        return f"{source} ({'exists' if Path(source).expanduser().is_file() else 'MISSING'})"
    first = f", first {limit} rows" if limit else ""
    return f"hub dataset {source}:{split}{first} (not loaded in a dry run)"


def dry_run(cfg: Config, resume: bool = False) -> int:
    """Print the resolved config, the placement plan and the warnings; exit code 0 (a config error never gets
    here: it fails while loading, as for a real run)."""
    from rl.learner.engine import deepspeed_config

    roles, why = run_roles(cfg)
    plan = placement_plan(cfg, roles)
    warnings = environment_warnings(cfg, plan)
    print("# reasonrl train --dry-run: resolved config (what the run would write to config.yaml)")
    print(dump_config(cfg), end="")
    print("\n# run")
    print(f"algorithm: {cfg.algorithm.name}; steps: {cfg.trainer.max_steps} x {make_step(cfg).describe()}; run "
          f"folder {cfg.trainer.output_dir}{' (resumed)' if resume else ''}")
    print(f"model: {cfg.model.path} ({cfg.model.dtype}); data: "
          f"{_data_line(cfg.data.train, cfg.data.train_split, cfg.data.train_limit)}")
    print(f"rollout backend: {cfg.rollout.backend}{' ' + json.dumps(cfg.rollout.vllm) if cfg.rollout.vllm else ''}; "
          f"weight sync: {cfg.weight_sync.mode}")
    ranks = cfg.learner.num_ranks
    ds = deepspeed_config(cfg.learner, ranks, cfg.model.dtype)
    print(f"learner: {ranks} rank(s), DeepSpeed ZeRO-{cfg.learner.zero_stage}, bf16={ds['bf16']['enabled']}, "
          f"lr {cfg.learner.lr}, micro-batch {cfg.learner.micro_batch_size}, gradient checkpointing "
          f"{cfg.learner.gradient_checkpointing}")
    print("\n# placement plan (rl/cluster/placement.py)")
    print(f"roles started: {', '.join(roles)}" + "".join(f"\n  - {w}" for w in why))
    for role, e in plan["roles"].items():
        pg = e["placement_group"]
        where = ("no placement group (empty bundle: scheduled as on one machine)" if pg is None else pg
                 if isinstance(pg, str) else f"placement group of {pg['bundles']} x {json.dumps(pg['bundle'])}, "
                 f"{pg['strategy']}")
        extra = f", resources {json.dumps(e['resources'])}" if e["resources"] else ""
        print(f"{role}: {e['actors']} actor(s), each num_cpus {e['num_cpus']:g}, num_gpus {e['num_gpus']:g}{extra}; "
              f"{where}")
    print(f"colocation: {'on' if plan['colocate'] else 'off'}; GPUs in all: {plan['total_gpus']:g}; CPUs reserved: "
          f"{plan['total_cpus_reserved']:g}")
    print("\n# environment" + ("" if warnings else ": nothing missing here"))
    for w in warnings:
        print(f"warning: {w}")
    print("dry run: nothing was started (no Ray, no model download)")
    return 0
