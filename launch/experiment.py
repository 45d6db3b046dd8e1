"""`reasonrl experiment CONFIG... --out DIR`: train several methods from the same start and compare them.

Each config is trained into DIR/<config name> (a finished run there with the same config is reused, so an
interrupted experiment picks up where it stopped); with `--seeds S...` once per seed, the config's own seed in
DIR/<config name> and any other in DIR/<config name>-seed<S>. launch.experiment_report then writes the tables
(results.md, results.json) and figures (compression.png, accuracy_at_budget.png): per run and pooled over seeds,
held-out accuracy and tokens with 95% bootstrap intervals over problems, paired differences against the first
config, truncation, redundancy, zero-advantage groups, entropy and the training-token cost.

The configs must agree on everything but `algorithm`, `reward` and `logging`: same model, data, sampling budget,
learner and seed, so the methods differ only in how they turn rollouts into updates. Their start evaluations are
then identical, which the report checks. Two method settings live outside `algorithm` and may differ too (METHOD_KEYS):
how prompts are drawn (`data.sampler`, `data.gdro`: Prompt-GDRO) and how the same sample budget is split over them
(`rollout.allocation`, `rollout.gdro`: Rollout-GDRO).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import yaml

from launch.experiment_report import build_report, end_eval, write_report
from launch.experiment_sampled import run_sampled_evals, sampled_report
from launch.experiment_steps import problem_rows
from launch.run import load_training_config, train_run
from rl.config.schema import Config, ConfigError, dump_config, load_config
from rl.store.metrics import EVENTS_FILE

SHARED_SECTIONS = ("model", "data", "rollout", "learner", "trainer", "ray")
# Keys of the shared sections that belong to the method (docs/algorithms.md, "GDRO"): the data and the budget stay
# the same, only which prompts are drawn and how the samples are spread differ.
METHOD_KEYS = {"data": ("sampler", "gdro"), "rollout": ("allocation", "gdro")}


class PlannedRun(NamedTuple):
    method: str  # the config file stem
    seed: int
    cfg: Config  # its trainer.output_dir is the run folder


def load_configs(paths: list[str], out: Path, overrides: list[str], suffix: str = "") -> dict[str, Config]:
    """Validate every config before anything trains; names are the config file stems, folders DIR/<stem><suffix>."""
    cfgs: dict[str, Config] = {}
    for path in paths:
        name = Path(path).stem
        if name in cfgs:
            raise ConfigError(f"two configs are named {name!r}; their runs would share a folder")
        folder = (out / f"{name}{suffix}").resolve()
        cfgs[name] = load_training_config(path, [*overrides, f"trainer.output_dir={folder}"])
    first_name, first = next(iter(cfgs.items()))
    for name, cfg in cfgs.items():
        for section in SHARED_SECTIONS:
            a, b = getattr(first, section).model_dump(), getattr(cfg, section).model_dump()
            if section == "trainer":
                a.pop("output_dir"), b.pop("output_dir")
            for key in METHOD_KEYS.get(section, ()):
                a.pop(key), b.pop(key)
            if a != b:
                diff = sorted(k for k in a if a[k] != b.get(k))
                raise ConfigError(f"config key '{section}.{diff[0] if diff else '?'}': {name} differs from "
                                  f"{first_name}; compared methods must share {', '.join(SHARED_SECTIONS)}")
    for cfg in list(cfgs.values())[1:]:
        # Same start policy, same greedy decoding: the start evaluation would repeat the first method's exactly
        # (minutes of CPU each). Sameness of the start is checked on the step-1 rollouts instead.
        cfg.trainer.eval_at_start = False
    return cfgs


def plan_runs(paths: list[str], out: Path, overrides: list[str] = (),
              seeds: list[int] | None = None) -> list[PlannedRun]:
    """Every run of the experiment, in training order: seed-major (every method at the first seed, then at the
    next), so a comparison across all methods exists after the first seed's block.

    The run at the config's own seed (after the overrides) keeps the folder DIR/<stem> that experiments without
    --seeds have always used, so those runs are reused; any other seed S trains into DIR/<stem>-seed<S>."""
    own = load_configs(paths, out, list(overrides))
    own_seed = next(iter(own.values())).trainer.seed  # the same for every config: load_configs checks `trainer`
    plan = []
    for seed in dict.fromkeys(seeds) if seeds else [own_seed]:
        # Loaded again rather than copied: the seed goes through the same override and validation path as `train`.
        cfgs = own if seed == own_seed else load_configs(paths, out, [*overrides, f"trainer.seed={seed}"],
                                                         suffix=f"-seed{seed}")
        plan += [PlannedRun(name, seed, cfg) for name, cfg in cfgs.items()]
    return plan


def finished(cfg: Config) -> bool:
    """A run folder that holds this exact config and its final held-out evaluation."""
    out = Path(cfg.trainer.output_dir)
    if not (out / "config.yaml").is_file() or not (out / EVENTS_FILE).is_file():
        return False
    saved, wanted = _saved_config(out / "config.yaml"), yaml.safe_load(dump_config(cfg))
    for c in (saved, wanted):
        c["trainer"].pop("overwrite", None)  # how the folder was claimed, not what was trained
    if saved != wanted:
        return False
    return end_eval(out, cfg.trainer.max_steps) is not None


def _saved_config(path: Path) -> dict:
    """A run's saved config with today's defaults filled in: a key added to the schema after the run finished,
    at its default, is what the run did, so it must not turn an experiment's finished runs into ones to retrain.
    A saved config the schema no longer accepts is compared as written (and then differs)."""
    try:
        return yaml.safe_load(dump_config(load_config(path, check_environment=False)))
    except ConfigError:
        return yaml.safe_load(path.read_text())


def run_experiment(paths: list[str], out: Path, overrides: list[str] = (), command: str = "",
                   seeds: list[int] | None = None, sampled: int = 0) -> dict:
    """Train (or reuse) every planned run, then report; returns the report (results.json plus private keys).
    `sampled` K > 0: also K sampled held-out responses per problem from the start and every final policy
    (launch.experiment_sampled); sampled responses already in the folders are reported either way."""
    if sampled < 0:
        raise ConfigError(f"--sampled must be >= 0, got {sampled}")
    plan = plan_runs(paths, out, list(overrides), seeds)  # every config valid before the first one trains
    command = command or ("reasonrl experiment " + " ".join(paths) + f" --out {out}"
                          + (" --seeds " + " ".join(map(str, seeds)) if seeds else "")
                          + (f" --sampled {sampled}" if sampled else ""))
    done: list[PlannedRun] = []
    for i, run in enumerate(plan):
        label = f"{run.method} (seed {run.seed})" if seeds else run.method
        if finished(run.cfg):
            print(f"{label}: reusing the finished run in {run.cfg.trainer.output_dir}", flush=True)
        else:
            run.cfg.trainer.overwrite = True  # an unfinished or different run there is moved aside, never mixed in
            print(f"{label}: training into {run.cfg.trainer.output_dir}", flush=True)
            train_run(run.cfg)
        done.append(run)
        if i + 1 < len(plan) and plan[i + 1].seed != run.seed:
            # A seed's block is complete: its report is already a full comparison, written before the next seed.
            write_report(build_report((r.method, r.cfg) for r in done), out, command)
            print(f"partial report (seeds {', '.join(str(s) for s in dict.fromkeys(r.seed for r in done))}) in "
                  f"{out}", flush=True)
    if sampled:
        run_sampled_evals([(r.method, r.seed, r.cfg) for r in done], out, sampled)
    report = build_report((r.method, r.cfg) for r in done)
    report["sampled"] = sampled_report([(r.method, r.cfg) for r in done], out, problem_rows(plan[0].cfg))
    print(write_report(report, out, command))
    return report
