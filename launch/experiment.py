"""`reasonrl experiment CONFIG... --out DIR`: train several methods from the same start and compare them.

Each config is trained into DIR/<config name> (a finished run there with the same config is reused, so an
interrupted experiment picks up where it stopped), then one table (results.md, results.json) and one figure
(compression.png) report, per method: held-out accuracy at start and end with a 95% bootstrap interval over
problems, mean held-out response tokens, the fraction of zero-advantage groups, and the entropy curve.

The configs must agree on everything but `algorithm`, `reward` and `logging`: same model, data, sampling budget,
learner and seed, so the methods differ only in how they turn rollouts into updates. Their start evaluations are
then identical, which the report checks. Two method settings live outside `algorithm` and may differ too (METHOD_KEYS):
how prompts are drawn (`data.sampler`, `data.gdro`: Prompt-GDRO) and how the same sample budget is split over them
(`rollout.allocation`, `rollout.gdro`: Rollout-GDRO).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from eval.stats import bootstrap_ci
from launch.run import load_training_config, train_run
from rl.config import Config, ConfigError, dump_config
from rl.metrics import EVENTS_FILE, METRICS_FILE, read_metrics

SHARED_SECTIONS = ("model", "data", "rollout", "learner", "trainer", "ray")
# Keys of the shared sections that belong to the method (docs/algorithms.md, "GDRO"): the data and the budget stay
# the same, only which prompts are drawn and how the samples are spread differ.
METHOD_KEYS = {"data": ("sampler", "gdro"), "rollout": ("allocation", "gdro")}


def load_configs(paths: list[str], out: Path, overrides: list[str]) -> dict[str, Config]:
    """Validate every config before anything trains; names are the config file stems."""
    cfgs: dict[str, Config] = {}
    for path in paths:
        name = Path(path).stem
        if name in cfgs:
            raise ConfigError(f"two configs are named {name!r}; their runs would share a folder")
        cfgs[name] = load_training_config(path, [*overrides, f"trainer.output_dir={(out / name).resolve()}"])
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


def finished(cfg: Config) -> bool:
    """A run folder that holds this exact config and its final held-out evaluation."""
    out = Path(cfg.trainer.output_dir)
    if not (out / "config.yaml").is_file() or not (out / EVENTS_FILE).is_file():
        return False
    saved, wanted = yaml.safe_load((out / "config.yaml").read_text()), yaml.safe_load(dump_config(cfg))
    for c in (saved, wanted):
        c["trainer"].pop("overwrite", None)  # how the folder was claimed, not what was trained
    if saved != wanted:
        return False
    return end_eval(out, cfg.trainer.max_steps) is not None


def _evals(run_dir: Path) -> list[dict]:
    return [e for e in read_metrics(run_dir / EVENTS_FILE) if e.get("event") == "eval" and "correct" in e]


def end_eval(run_dir: Path, step: int) -> dict | None:
    return next((e for e in _evals(run_dir) if e["step"] == step), None)


def start_eval(run_dir: Path) -> dict | None:
    return next((e for e in _evals(run_dir) if e["step"] == 0), None)


def summarize_run(name: str, cfg: Config) -> dict:
    run = Path(cfg.trainer.output_dir)
    rows = read_metrics(run / METRICS_FILE)
    start, end = start_eval(run), end_eval(run, cfg.trainer.max_steps)
    if end is None:
        raise RuntimeError(f"{run}: no final held-out evaluation (was the run interrupted?)")
    out = {"method": name, "algorithm": cfg.algorithm.name, "steps": len(rows), "n_eval": end["n"],
           "zero_adv_groups": _mean([r.get("zero_adv_groups") for r in rows]),
           "entropy_first": rows[0].get("entropy") if rows else None,
           "entropy_last": rows[-1].get("entropy") if rows else None,
           "train_tokens_first": rows[0].get("response_tokens_mean") if rows else None,
           "train_tokens_last": rows[-1].get("response_tokens_mean") if rows else None,
           "curves": {k: [r.get(k) for r in rows] for k in ("zero_adv_groups", "entropy", "response_tokens_mean",
                                                           "accuracy")}}
    out["_step1_accuracy"] = rows[0].get("accuracy") if rows else None
    # Methods that choose their step-1 prompts or groups otherwise (GDRO, dynamic sampling) cannot be compared there.
    out["_own_draws"] = (cfg.data.sampler != "uniform" or cfg.rollout.allocation != "fixed"
                         or cfg.algorithm.dynamic_sampling)
    for when, ev in (("start", start), ("end", end)):
        if ev is None:
            continue
        out[f"acc_{when}"] = ev["accuracy"]
        out[f"acc_{when}_ci"] = bootstrap_ci(ev["correct"])
        out[f"tokens_{when}"] = _mean(ev["tokens"])
        out[f"tokens_{when}_ci"] = bootstrap_ci(ev["tokens"])
    return out


def _mean(xs) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def _fmt(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def markdown_table(results: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| method | held-out accuracy start → end [95% CI of end] | mean held-out tokens start → end [95% CI] "
             "| zero-adv groups (mean over steps) | entropy/token first → last step | train tokens first → last |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lo, hi = r["acc_end_ci"]
        tlo, thi = r["tokens_end_ci"]
        lines.append(
            f"| {r['method']} ({r['algorithm']}) | {_fmt(r.get('acc_start'))} → **{_fmt(r['acc_end'])}** "
            f"[{lo:.3f}, {hi:.3f}] | {_fmt(r.get('tokens_start'), '.1f')} → **{_fmt(r['tokens_end'], '.1f')}** "
            f"[{tlo:.1f}, {thi:.1f}] | {_fmt(r['zero_adv_groups'], '.2f')} | {_fmt(r['entropy_first'])} → "
            f"{_fmt(r['entropy_last'])} | {_fmt(r['train_tokens_first'], '.1f')} → "
            f"{_fmt(r['train_tokens_last'], '.1f')} |")
    n = results[0]["n_eval"]
    lines += ["", f"Held-out: {n} problems, one greedy response each; intervals: percentile bootstrap over problems "
                  "(10,000 resamples). The start evaluation is run once, by the first method (every method starts "
                  "from the same policy)."]
    step1 = {(r["train_tokens_first"], r["_step1_accuracy"]) for r in results if not r.get("_own_draws")}
    if len(step1) > 1:
        lines.append("WARNING: the step-1 rollouts differ between methods: they did not start from the same policy.")
    elif step1:
        lines.append("Same start, checked: every method's step-1 rollouts have the same mean length and accuracy"
                     + (" (methods that draw their own prompts or groups excepted)."
                        if any(r.get("_own_draws") for r in results) else "."))
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure  # matplotlib: only once results exist to plot

    fig = Figure(figsize=(12, 8), dpi=100)
    axes = fig.subplots(2, 2)
    names = [r["method"] for r in results]
    xs = range(len(results))
    for ax, key, label in ((axes[0][0], "acc", "held-out accuracy"), (axes[0][1], "tokens", "held-out mean tokens")):
        for offset, when, color in ((-0.2, "start", "tab:gray"), (0.2, "end", "tab:blue")):
            vals = [r.get(f"{key}_{when}") for r in results]
            if any(v is None for v in vals):
                continue
            err = [[v - r[f"{key}_{when}_ci"][0] for v, r in zip(vals, results)],
                   [r[f"{key}_{when}_ci"][1] - v for v, r in zip(vals, results)]]
            ax.bar([x + offset for x in xs], vals, width=0.4, yerr=err, capsize=4, color=color, label=when)
        ax.set_xticks(list(xs), names)
        ax.set_title(f"{label} (95% bootstrap CI)")
        ax.legend()
    for ax, key, label in ((axes[1][0], "zero_adv_groups", "zero-advantage groups per step"),
                           (axes[1][1], "entropy", "mean token entropy per step")):
        for r in results:
            ys = r["curves"][key]
            ax.plot(range(1, len(ys) + 1), [math.nan if y is None else y for y in ys], label=r["method"])
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def run_experiment(paths: list[str], out: Path, overrides: list[str] = (), command: str = "") -> list[dict]:
    cfgs = load_configs(paths, out, list(overrides))  # every config valid before the first one trains
    for name, cfg in cfgs.items():
        if finished(cfg):
            print(f"{name}: reusing the finished run in {cfg.trainer.output_dir}", flush=True)
            continue
        cfg.trainer.overwrite = True  # an unfinished or different run there is moved aside, never mixed in
        print(f"{name}: training into {cfg.trainer.output_dir}", flush=True)
        train_run(cfg)
    results = [summarize_run(name, cfg) for name, cfg in cfgs.items()]
    for r in results[1:]:  # one start evaluation serves every method (see load_configs)
        for key in ("acc_start", "acc_start_ci", "tokens_start", "tokens_start_ci"):
            if key in results[0]:
                r[key] = results[0][key]
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, command or "reasonrl experiment " + " ".join(paths) + f" --out {out}")
    (out / "results.md").write_text(table)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    (out / "results.json").write_text(json.dumps(public, indent=1))
    plot(results, out / "compression.png")
    print(table)
    return results
