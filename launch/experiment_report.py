"""The report of `reasonrl experiment`: per-run and pooled tables (results.md, results.json) and two figures
(compression.png, accuracy_at_budget.png), read from finished run folders only.

Everything here comes from each run's metrics.jsonl and the per-problem outcomes of its held-out evaluations in
events.jsonl, so a report can be rebuilt from the folders without generating again. The reference method is the
first config: every other method is compared with it at the same seed, problem by problem, because at the same seed
the two saw the same prompts from the same start and only the method differs. No model, Ray or launch.run imports:
the report is cheap to build and to test.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np

from eval.budget import accuracy_at_budget
from eval.stats import bootstrap_ci, paired_difference_ci, paired_ratio_ci
from launch.experiment_sampled import markdown_sampled
from launch.experiment_steps import markdown_steps, redundancy_curves, steps_report
from rl.config.schema import Config
from rl.store.metrics import EVENTS_FILE, METRICS_FILE, read_metrics

START = "start policy"  # the frontier's label for the shared start (a config stem has no space in practice)
FRONTIER_POINTS = 4  # budgets per doubling on the frontier (eval.budget.budget_grid)
REDUNDANCY = "testbed_redundancy"  # the reward function whose per-problem score is the redundant-step fraction


def _evals(run_dir: Path) -> list[dict]:
    return [e for e in read_metrics(run_dir / EVENTS_FILE) if e.get("event") == "eval" and "correct" in e]


def end_eval(run_dir: Path, step: int) -> dict | None:
    return next((e for e in _evals(run_dir) if e["step"] == step), None)


def start_eval(run_dir: Path) -> dict | None:
    return next((e for e in _evals(run_dir) if e["step"] == 0), None)


def summarize_run(method: str, cfg: Config) -> dict:
    """One run's own numbers. The comparisons (start accuracy, gain, paired differences) need the other runs of the
    same seed and are added by compare_to_reference."""
    run = Path(cfg.trainer.output_dir)
    rows = read_metrics(run / METRICS_FILE)
    start, end = start_eval(run), end_eval(run, cfg.trainer.max_steps)
    if end is None:
        raise RuntimeError(f"{run}: no final held-out evaluation (was the run interrupted?)")
    generated = [r.get("generated_tokens") for r in rows]
    out = {"method": method, "algorithm": cfg.algorithm.name, "seed": cfg.trainer.seed, "run": run.name,
           "steps": len(rows), "n_eval": end["n"],
           "acc_end": end["accuracy"], "acc_end_ci": list(bootstrap_ci(end["correct"])),
           "tokens_end": _mean(end["tokens"]), "tokens_end_ci": list(bootstrap_ci(end["tokens"])),
           "truncation_rate": _mean(end["truncated"]) if "truncated" in end else None,
           "redundancy_rate": _mean((end.get("scores") or {}).get(REDUNDANCY, ())),
           "zero_adv_groups": _mean([r.get("zero_adv_groups") for r in rows]),
           "entropy_first": rows[0].get("entropy") if rows else None,
           "entropy_last": rows[-1].get("entropy") if rows else None,
           "train_tokens_first": rows[0].get("response_tokens_mean") if rows else None,
           "train_tokens_last": rows[-1].get("response_tokens_mean") if rows else None,
           # A partial sum (a run whose older steps lack the key) would understate the cost: all steps or none.
           "generated_tokens": int(sum(generated)) if rows and None not in generated else None,
           "curves": {k: [r.get(k) for r in rows] for k in ("zero_adv_groups", "entropy", "response_tokens_mean",
                                                           "accuracy")}}
    out["_end"], out["_start"] = end, start
    out["_step1_accuracy"] = rows[0].get("accuracy") if rows else None
    # Methods that choose their step-1 prompts or groups otherwise (GDRO, dynamic sampling) cannot be compared there.
    out["_own_draws"] = (cfg.data.sampler != "uniform" or cfg.rollout.allocation != "fixed"
                         or cfg.algorithm.dynamic_sampling)
    out["_max_new_tokens"] = cfg.rollout.max_new_tokens
    return out


def compare_to_reference(results: list[dict]) -> str:
    """Fill in, per run, what depends on its seed's reference run (the first method's): the start evaluation (only
    that run makes one, see launch.experiment.load_configs), the accuracy gain per million generated tokens, and
    the paired accuracy difference and token ratio against the reference. Returns the reference method's name."""
    reference = results[0]["method"]
    refs = {r["seed"]: r for r in results if r["method"] == reference}
    for r in results:
        ref = refs.get(r["seed"])
        start = ref["_start"] if ref is not None else None
        r["acc_start"] = r["acc_start_ci"] = r["tokens_start"] = r["tokens_start_ci"] = None
        if start is not None:
            r["acc_start"], r["acc_start_ci"] = start["accuracy"], list(bootstrap_ci(start["correct"]))
            r["tokens_start"], r["tokens_start_ci"] = _mean(start["tokens"]), list(bootstrap_ci(start["tokens"]))
        r["gain_per_million_tokens"] = None
        if r["acc_start"] is not None and r["generated_tokens"]:
            r["gain_per_million_tokens"] = (r["acc_end"] - r["acc_start"]) / (r["generated_tokens"] / 1e6)
        r["reference"] = r["method"] == reference
        r["acc_diff_vs_ref"] = r["acc_diff_vs_ref_ci"] = r["token_ratio_vs_ref"] = r["token_ratio_vs_ref_ci"] = None
        if r["reference"] or ref is None:
            continue
        pairs = _matched(ref["_end"], r["_end"])
        if not pairs:
            continue
        a, b = zip(*pairs)
        d, lo, hi = paired_difference_ci([p["correct"] for p in a], [p["correct"] for p in b])
        r["acc_diff_vs_ref"], r["acc_diff_vs_ref_ci"] = d, [lo, hi]
        if sum(p["tokens"] for p in a) > 0:  # a ratio to nothing has no value
            q, lo, hi = paired_ratio_ci([p["tokens"] for p in a], [p["tokens"] for p in b])
            r["token_ratio_vs_ref"], r["token_ratio_vs_ref_ci"] = q, [lo, hi]
    return reference


def pool(results: list[dict], reference: str) -> list[dict]:
    """One row per method over the seeds it has. Intervals resample problems, each problem carrying its mean over
    the seeds: seeds share the held-out problems, so a problem's outcomes across seeds are not independent units."""
    refs = {r["seed"]: r for r in results if r["method"] == reference}
    pooled = []
    for method in _unique(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        correct, tokens = _per_problem_means(runs, "correct"), _per_problem_means(runs, "tokens")
        row = {"method": method, "algorithm": runs[0]["algorithm"], "seeds": [r["seed"] for r in runs],
               "n_seeds": len(runs), "reference": method == reference,
               "acc_end": _mean([r["acc_end"] for r in runs]), "acc_end_ci": list(bootstrap_ci(correct)),
               "tokens_end": _mean([r["tokens_end"] for r in runs]), "tokens_end_ci": list(bootstrap_ci(tokens)),
               "acc_diff_vs_ref": None, "acc_diff_vs_ref_ci": None,
               "token_ratio_vs_ref": None, "token_ratio_vs_ref_ci": None}
        for key in ("truncation_rate", "redundancy_rate", "gain_per_million_tokens"):
            row[key] = _mean([r[key] for r in runs])
        if method != reference:
            # Only seeds both have, each problem matched within its seed: the seed's shared draws cancel.
            diffs: dict[str, list[float]] = {}
            tok_ref: dict[str, float] = {}
            tok_m: dict[str, float] = {}
            for r in runs:
                if r["seed"] not in refs:
                    continue
                for a, b in _matched(refs[r["seed"]]["_end"], r["_end"]):
                    diffs.setdefault(a["id"], []).append(float(b["correct"]) - float(a["correct"]))
                    tok_ref[a["id"]] = tok_ref.get(a["id"], 0.0) + a["tokens"]
                    tok_m[a["id"]] = tok_m.get(a["id"], 0.0) + b["tokens"]
            if diffs:
                per_problem = [float(np.mean(v)) for v in diffs.values()]
                row["acc_diff_vs_ref"] = float(np.mean(per_problem))
                row["acc_diff_vs_ref_ci"] = list(bootstrap_ci(per_problem))
                # Summing tokens per problem over the seeds and then over problems: sum method / sum reference.
                if sum(tok_ref.values()) > 0:
                    ids = list(tok_ref)
                    q, lo, hi = paired_ratio_ci([tok_ref[i] for i in ids], [tok_m[i] for i in ids])
                    row["token_ratio_vs_ref"], row["token_ratio_vs_ref_ci"] = q, [lo, hi]
        pooled.append(row)
    return pooled


def frontier_curves(results: list[dict], reference: str) -> tuple[int, dict[str, dict[str, float]]]:
    """(budget, {label: accuracy at budget}) from the end evaluations, one curve per method with its seeds' responses
    pooled as samples of the same problem, and one for the start policy (the reference's start evaluations)."""
    budget = max(r["_max_new_tokens"] for r in results)
    # Four points per doubling: methods compared from one start differ by tens of tokens, not by factors of two.
    curves: dict[str, dict[str, float]] = {}
    starts = [r["_start"] for r in results if r["method"] == reference and r["_start"] is not None]
    if starts:
        curves[START] = accuracy_at_budget([x for ev in starts for x in _records(ev)], budget, FRONTIER_POINTS)
    for method in _unique(r["method"] for r in results):
        curves[method] = accuracy_at_budget([x for r in results if r["method"] == method
                                             for x in _records(r["_end"])], budget, FRONTIER_POINTS)
    return budget, curves


def build_report(runs: Iterable[tuple[str, Config]]) -> dict:
    """Everything results.json holds (plus private `_` keys on the runs, for the tables and figures)."""
    runs = list(runs)
    results = [summarize_run(method, cfg) for method, cfg in runs]
    reference = compare_to_reference(results)
    budget, curves = frontier_curves(results, reference)
    return {"reference": reference, "seeds": _unique(r["seed"] for r in results), "runs": results,
            "pooled": pool(results, reference), "budget": budget, "accuracy_at_budget": curves,
            "steps": steps_report(runs), "redundancy_curves": redundancy_curves(runs)}


def write_report(report: dict, out: Path, command: str) -> str:
    """results.md, results.json, compression.png and accuracy_at_budget.png into `out`; returns the markdown."""
    from eval.plots import accuracy_at_budget as plot_frontier  # matplotlib: only once results exist to plot

    out.mkdir(parents=True, exist_ok=True)
    table = markdown_report(report, command)
    if report.get("sampled"):
        table += "\n".join(markdown_sampled(report["sampled"])) + "\n"
    (out / "results.md").write_text(table)
    public = {**report, "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in report["runs"]]}
    (out / "results.json").write_text(json.dumps(public, indent=1))
    plot(report["runs"], out / "compression.png")
    plot_frontier(report["accuracy_at_budget"], "held-out (end of training)", out / "accuracy_at_budget.png")
    if report.get("sampled"):
        plot_frontier(report["sampled"]["accuracy_at_budget"], f"held-out, {report['sampled']['k']} samples per "
                      "problem (end of training)", out / "accuracy_at_budget_sampled.png")
    if report.get("redundancy_curves"):
        plot_curves(report["redundancy_curves"], out / "redundancy_curves.png")
    return table


def markdown_report(report: dict, command: str) -> str:
    results, seeds = report["runs"], report["seeds"]
    lines = [f"Command: `{command}`", "", f"Reference method: {report['reference']} (the first config); Δ and "
             "ratio columns compare with it at the same seed, problem by problem.", "",
             "| method | seed | accuracy start → end [95% CI] | Δ accuracy vs ref [CI] "
             "| mean tokens start → end [CI] | token ratio vs ref [CI] | truncated | redundancy | zero-adv groups "
             "| entropy first → last | train tokens first → last | generated tokens "
             "| Δ accuracy / M generated tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['method']} ({r['algorithm']}) | {r['seed']} | {_fmt(r['acc_start'])} → **{_fmt(r['acc_end'])}** "
            f"{_ci(r['acc_end_ci'])} | {_vs_ref(r, 'acc_diff_vs_ref', '+.3f')} | {_fmt(r['tokens_start'], '.1f')} → "
            f"**{_fmt(r['tokens_end'], '.1f')}** {_ci(r['tokens_end_ci'], '.1f')} | "
            f"{_vs_ref(r, 'token_ratio_vs_ref', '.3f')} | {_fmt(r['truncation_rate'])} | "
            f"{_fmt(r['redundancy_rate'])} | {_fmt(r['zero_adv_groups'], '.2f')} | {_fmt(r['entropy_first'])} → "
            f"{_fmt(r['entropy_last'])} | {_fmt(r['train_tokens_first'], '.1f')} → "
            f"{_fmt(r['train_tokens_last'], '.1f')} | {_fmt(r['generated_tokens'], ',d')} | "
            f"{_fmt(r['gain_per_million_tokens'], '+.3f')} |")
    if len(seeds) > 1:
        lines += ["", "Pooled over seeds, per method:", "",
                  "| method | seeds (n) | accuracy [95% CI] | Δ accuracy vs ref [CI] | mean tokens [CI] "
                  "| token ratio vs ref [CI] | truncated | redundancy | Δ accuracy / M generated tokens |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in report["pooled"]:
            lines.append(
                f"| {p['method']} ({p['algorithm']}) | {', '.join(map(str, p['seeds']))} ({p['n_seeds']}) | "
                f"**{_fmt(p['acc_end'])}** {_ci(p['acc_end_ci'])} | {_vs_ref(p, 'acc_diff_vs_ref', '+.3f')} | "
                f"**{_fmt(p['tokens_end'], '.1f')}** {_ci(p['tokens_end_ci'], '.1f')} | "
                f"{_vs_ref(p, 'token_ratio_vs_ref', '.3f')} | {_fmt(p['truncation_rate'])} | "
                f"{_fmt(p['redundancy_rate'])} | {_fmt(p['gain_per_million_tokens'], '+.3f')} |")
    n = results[0]["n_eval"]
    lines += ["", f"Held-out: {n} problems, one greedy response each, at the end of training (start: before it). "
              "Intervals: 95% percentile bootstrap over problems (10,000 resamples). The start evaluation is run "
              "once per seed, by the reference method (every method of a seed starts from the same policy).", "",
              "Columns: *accuracy*: share of held-out problems solved; *Δ accuracy vs ref*: mean over problems of "
              "(this method − reference) correctness; *mean tokens*: held-out response tokens; *token ratio vs ref*: "
              "this method's held-out tokens summed over problems / the reference's; *truncated*: share of held-out "
              f"responses cut off at max_new_tokens; *redundancy*: mean `{REDUNDANCY}` score of the held-out "
              "responses (share of redundant steps; testbed data only); *zero-adv groups*: share of rollout groups "
              "with zero advantage, mean over steps; *entropy*: mean token entropy at the first and last step; "
              "*generated tokens*: every token generated for training, dynamic-sampling draws that were dropped "
              "included; *Δ accuracy / M generated tokens*: (end − start accuracy) per million generated tokens. "
              + ("Pooled: accuracy and tokens are means over seeds, their intervals resample problems carrying "
                 "their mean over seeds; Δ and ratio pool the same-seed pairs; the last three are means over seeds. "
                 if len(seeds) > 1 else "")
              + "–: not recorded (runs from before these were logged).", "",
              f"accuracy_at_budget.png: held-out accuracy if generation stopped at B tokens (a response counts if "
              f"it finished within B and is correct), seeds pooled; B up to {report['budget']}."]
    for seed in seeds:
        lines.append(_start_check([r for r in results if r["seed"] == seed], seed if len(seeds) > 1 else None))
    return "\n".join(x for x in lines if x is not None) + "\n" + markdown_steps(report.get("steps"))


def _start_check(results: list[dict], seed: int | None) -> str | None:
    """Same seed, same start: the step-1 rollouts of methods that draw the same prompts and groups must agree."""
    prefix = "" if seed is None else f"Seed {seed}: "
    step1 = {(r["train_tokens_first"], r["_step1_accuracy"]) for r in results if not r.get("_own_draws")}
    if len(step1) > 1:
        return prefix + "WARNING: the step-1 rollouts differ between methods: they did not start from the same policy."
    if step1:
        return (prefix + "Same start, checked: every method's step-1 rollouts have the same mean length and accuracy"
                + (" (methods that draw their own prompts or groups excepted)."
                   if any(r.get("_own_draws") for r in results) else "."))
    return None


def plot(results: list[dict], path: Path) -> None:
    """2x2: accuracy and tokens at start and end (bars per run), zero-advantage groups and entropy per step."""
    from matplotlib.figure import Figure  # matplotlib: only once results exist to plot

    fig = Figure(figsize=(max(12, 1.2 * len(results)), 8), dpi=100)
    axes = fig.subplots(2, 2)
    several = len({r["seed"] for r in results}) > 1
    names = [f"{r['method']}\nseed {r['seed']}" if several else r["method"] for r in results]
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
        for r, name in zip(results, names):
            ys = r["curves"][key]
            ax.plot(range(1, len(ys) + 1), [math.nan if y is None else y for y in ys], label=name.replace("\n", " "))
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path, window: int = 10) -> None:
    """Redundancy rate of the training samples per step, one line per method (seeds averaged), a moving mean of
    `window` steps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.subplots()
    for method, points in curves.items():
        steps, ys = zip(*points)
        smooth = np.convolve(ys, np.ones(min(window, len(ys))) / min(window, len(ys)), mode="valid")
        ax.plot(steps[len(steps) - len(smooth):], smooth, label=method)
    ax.set_xlabel("step")
    ax.set_title(f"training samples' redundancy rate (moving mean of {window} steps)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def _problems(ev: dict) -> dict[str, dict]:
    """{problem id: its outcome}; an event without ids pairs by position (the same held-out rows in order)."""
    ids = ev.get("ids") or list(range(len(ev["correct"])))
    truncated = ev.get("truncated") or [False] * len(ids)  # without the key: every response counted as finished
    return {str(i): {"id": str(i), "correct": float(c), "tokens": float(t), "truncated": bool(x)}
            for i, c, t, x in zip(ids, ev["correct"], ev["tokens"], truncated)}


def _matched(ref: dict, other: dict) -> list[tuple[dict, dict]]:
    """(reference outcome, other outcome) for every problem both evaluated, in the reference's order."""
    a, b = _problems(ref), _problems(other)
    return [(a[i], b[i]) for i in a if i in b]


def _per_problem_means(runs: list[dict], key: str) -> list[float]:
    """Per problem, the mean of `key` over the runs (seeds) that evaluated it."""
    values: dict[str, list[float]] = {}
    for r in runs:
        for i, p in _problems(r["_end"]).items():
            values.setdefault(i, []).append(p[key])
    return [float(np.mean(v)) for v in values.values()]


def _records(ev: dict) -> list[dict]:
    """An eval event as eval.budget records."""
    return [{"problem_id": p["id"], "correct": bool(p["correct"]), "tokens": int(p["tokens"]),
             "finish_reason": "length" if p["truncated"] else "stop"} for p in _problems(ev).values()]


def _unique(xs: Iterable) -> list:
    return list(dict.fromkeys(xs))


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]  # bools count as 0/1
    return sum(xs) / len(xs) if xs else None


def _fmt(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def _ci(ci, spec=".3f") -> str:
    return "" if ci is None else f"[{ci[0]:{spec}}, {ci[1]:{spec}}]"


def _vs_ref(row: dict, key: str, spec: str) -> str:
    if row["reference"]:
        return "ref"
    return f"{_fmt(row[key], spec)} {_ci(row[key + '_ci'], spec)}".strip()
