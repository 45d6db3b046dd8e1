"""Sampled held-out evaluation for `reasonrl experiment --sampled K`: avg@K accuracy, the accuracy-at-budget frontier
from sampled responses, and (on testbed rows) redundant steps per sampled response.

The experiment's own held-out evaluation is greedy: one response per problem. A method can shift the greedy path by a
step while the distribution it samples from (the one RL trained) moves differently, and a frontier built by cutting
one greedy answer at B tokens says nothing about how often a *sampled* answer fits in B. So, after training, every
run's final policy and the shared start policy answer each held-out problem K times at the training temperature and
budget, through `reasonrl eval` (eval.runner.run_eval: resumable, so a rerun of the experiment reuses what exists).
The samples live in <run>/heldout_sampled/ and <out>/start_sampled/ in the `reasonrl eval` layout; the report below
reads them back and generates nothing.

Intervals resample problems (each problem carries its mean over the K samples, and over seeds when pooled); Δ vs
the reference pairs problems at the same seed, as the greedy tables do.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.benchmarks import slug
from eval.budget import accuracy_at_budget
from eval.runner import SAMPLES_DIR, read_samples
from eval.stats import bootstrap_ci, paired_difference_ci
from rewards.testbed import count_steps
from rl.config.schema import Config, ConfigError

RUN_DIR, START_DIR = "heldout_sampled", "start_sampled"
START = "start policy"


def _settings(cfg: Config, k: int, seed: int):
    from eval.runner import EvalSettings  # rl.rollout (torch) only when an eval is about to run

    # The training distribution: rollout temperature, top-p and budget, the run's own prompt and verifier.
    return EvalSettings(samples=k, greedy=False, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                        max_new_tokens=cfg.rollout.max_new_tokens, seed=seed, verifier=cfg.reward.accuracy,
                        prompt_from_run=True, chunk_problems=16, batch_size=16 * k)


def run_sampled_evals(runs: list[tuple[str, int, Config]], out: Path, k: int) -> None:
    """Generate (or reuse) K samples per held-out problem for the start policy and every run's final policy."""
    from eval.runner import run_eval

    first = runs[0][2]
    if not first.data.eval:
        raise ConfigError("--sampled: the configs have no held-out set (data.eval) to sample")
    bench = [first.data.eval]
    limit = first.data.eval_size or None
    # The start has no run folder: its prompt comes from the first run's saved config (the same for every run).
    print(f"sampled held-out eval (avg@{k}) of the start policy into {out / START_DIR}", flush=True)
    run_eval(first.model.path, bench, out / START_DIR, _settings(first, k, seed=0), limit=limit,
             config_path=str(Path(first.trainer.output_dir) / "config.yaml"), progress=False)
    for method, seed, cfg in runs:
        run = Path(cfg.trainer.output_dir)
        print(f"sampled held-out eval (avg@{k}) of {method} (seed {seed}) into {run / RUN_DIR}", flush=True)
        run_eval(str(run), bench, run / RUN_DIR, _settings(cfg, k, seed=seed), limit=limit, progress=False)


def _samples(folder: Path, cfg: Config) -> list[dict] | None:
    path = folder / SAMPLES_DIR / f"{slug(cfg.data.eval)}.jsonl"
    recs = read_samples(path) if path.is_file() else []
    return recs or None


def _per_problem(recs: list[dict], key) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for r in recs:
        by.setdefault(str(r["problem_id"]), []).append(float(key(r)))
    return {p: float(np.mean(v)) for p, v in by.items()}


def _with_steps(recs: list[dict], rows: dict[str, dict] | None) -> list[dict]:
    """Each record with `necessary_kept` (every necessary step written exactly) where the row is a testbed row."""
    if not rows:
        return recs
    out = []
    for r in recs:
        row = rows.get(str(r["problem_id"]))
        if row is not None and "redundant_steps" in r:
            c = count_steps(row, r.get("completion", ""))
            r = {**r, "necessary_kept": c["necessary_missing"] == 0}
        out.append(r)
    return out


def _summary(recs: list[dict]) -> dict:
    acc = _per_problem(recs, lambda r: r["correct"])
    out = {"n_problems": len(acc), "samples": len(recs), "avg_at_k": float(np.mean(list(acc.values()))),
           "avg_at_k_ci": list(bootstrap_ci(list(acc.values()))),
           "tokens": float(np.mean([r["tokens"] for r in recs])),
           "truncated": float(np.mean([r.get("finish_reason") == "length" for r in recs]))}
    steps = [r for r in recs if "redundant_steps" in r]
    if steps:
        red = [int(r["redundant_steps"]) for r in steps]
        correct = [r for r in steps if r["correct"] and "necessary_kept" in r]
        out.update(redundant_mean=float(np.mean(red)),
                   distribution={str(i): red.count(i) for i in range(max(red) + 1)},
                   necessary_kept_correct=float(np.mean([r["necessary_kept"] for r in correct])) if correct else None)
    return out


def _paired(a: dict[str, float], b: dict[str, float]) -> dict:
    ids = sorted(set(a) & set(b))
    mean, lo, hi = paired_difference_ci([a[i] for i in ids], [b[i] for i in ids])
    return {"mean": mean, "ci": [lo, hi]}


def sampled_report(runs: list[tuple[str, Config]], out: Path, rows: dict[str, dict] | None) -> dict | None:
    """Per run, per method (seeds pooled) and for the start: avg@K [CI], tokens, truncation, redundant steps and
    their distribution, necessary steps kept; Δ avg@K and Δ redundant steps vs the reference at the same seed and vs
    the start; frontier curves from the samples. None when no run has sampled responses."""
    first = runs[0][1]
    if not first.data.eval:
        return None
    start = _samples(out / START_DIR, first)
    per_run = [(m, cfg, _samples(Path(cfg.trainer.output_dir) / RUN_DIR, cfg)) for m, cfg in runs]
    if start is None or any(recs is None for _, _, recs in per_run):
        return None
    start = _with_steps(start, rows)
    per_run = [(m, cfg, _with_steps(recs, rows)) for m, cfg, recs in per_run]
    reference = runs[0][0]
    k = max(int(r["sample"]) for r in start) + 1
    ref_by_seed = {cfg.trainer.seed: recs for m, cfg, recs in per_run if m == reference}
    start_acc = _per_problem(start, lambda r: r["correct"])
    has_steps = "redundant_steps" in start[0]
    start_red = _per_problem(start, lambda r: r["redundant_steps"]) if has_steps else {}

    def compare(recs: list[dict], refs: list[list[dict]] | None) -> dict:
        acc = _per_problem(recs, lambda r: r["correct"])
        row = {**_summary(recs), "avg_at_k_vs_start": _paired(start_acc, acc)}
        if has_steps:
            row["redundant_vs_start"] = _paired(start_red, _per_problem(recs, lambda r: r["redundant_steps"]))
        if refs is not None:
            ref = [x for rs in refs for x in rs]
            row["avg_at_k_vs_ref"] = _paired(_per_problem(ref, lambda r: r["correct"]), acc)
            if has_steps:
                row["redundant_vs_ref"] = _paired(_per_problem(ref, lambda r: r["redundant_steps"]),
                                                  _per_problem(recs, lambda r: r["redundant_steps"]))
        return row

    table = [{"method": m, "seed": cfg.trainer.seed,
              **compare(recs, None if m == reference else [ref_by_seed[cfg.trainer.seed]])}
             for m, cfg, recs in per_run]
    pooled, curves = [], {START: accuracy_at_budget(start, first.rollout.max_new_tokens, 4)}
    for method in dict.fromkeys(m for m, _, _ in per_run):
        mine = [(cfg.trainer.seed, recs) for m, cfg, recs in per_run if m == method]
        # Seeds pooled as more samples of the same problem (problem ids are shared); the reference's matching seeds.
        recs = [x for _, rs in mine for x in rs]
        refs = None if method == reference else [ref_by_seed[s] for s, _ in mine]
        seeds_acc = [float(np.mean(list(_per_problem(rs, lambda r: r["correct"]).values()))) for _, rs in mine]
        pooled.append({"method": method, "seeds": [s for s, _ in mine], **compare(recs, refs),
                       "avg_at_k_seed_spread": float(np.std(seeds_acc, ddof=1)) if len(mine) > 1 else None})
        curves[method] = accuracy_at_budget(recs, first.rollout.max_new_tokens, 4)
    return {"k": k, "temperature": first.rollout.temperature, "budget": first.rollout.max_new_tokens,
            "reference": reference, "start": compare(start, None), "runs": table, "pooled": pooled,
            "accuracy_at_budget": curves}


def _f(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def _d(d: dict | None, spec="+.3f") -> str:
    return "–" if d is None else f"{format(d['mean'], spec)} [{format(d['ci'][0], spec)}, {format(d['ci'][1], spec)}]"


def markdown_sampled(rep: dict) -> list[str]:
    k, steps = rep["k"], "redundant_mean" in rep["start"]
    head = (f"| method | seeds | avg@{k} [95% CI] | seed spread | Δ avg@{k} vs start [CI] | Δ avg@{k} vs "
            f"{rep['reference']} [CI] | mean tokens | truncated |")
    if steps:
        head += (" redundant steps | Δ vs start [CI] | Δ vs reference [CI] | distribution (0 / ... / 7) "
                 "| correct with every necessary step exact |")
    lines = ["", f"Sampled held-out responses ({k} per problem at temperature {rep['temperature']}, budget "
             f"{rep['budget']} tokens; `--sampled {k}`), seeds pooled:", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    s = rep["start"]
    for name, row, seeds in [(START, s, "–")] + [(p["method"], p, ", ".join(map(str, p["seeds"])))
                                                  for p in rep["pooled"]]:
        line = (f"| {name} | {seeds} | **{_f(row['avg_at_k'])}** [{_f(row['avg_at_k_ci'][0])}, "
                f"{_f(row['avg_at_k_ci'][1])}] | {_f(row.get('avg_at_k_seed_spread'))} | "
                f"{_d(row['avg_at_k_vs_start']) if row is not s else '–'} | {_d(row.get('avg_at_k_vs_ref'))} | "
                f"{_f(row['tokens'], '.1f')} | {_f(row['truncated'])} |")
        if steps:
            dist = " / ".join(str(row["distribution"].get(str(i), 0)) for i in range(8))
            line += (f" {_f(row['redundant_mean'], '.2f')} | "
                     f"{_d(row['redundant_vs_start'], '+.2f') if row is not s else '–'} | "
                     f"{_d(row.get('redundant_vs_ref'), '+.2f')} | {dist} | {_f(row['necessary_kept_correct'])} |")
        lines.append(line)
    lines += ["", f"avg@{k}: mean over problems of the share of the {k} samples that are correct (per seed, then "
              "pooled as more samples of each problem); intervals: bootstrap over problems; seed spread: standard "
              f"deviation of the per-seed avg@{k}; Δ: paired over problems, against the start policy's samples and "
              "against the reference's at the same seeds. accuracy_at_budget_sampled.png: the share of sampled "
              "responses that finished within B tokens and are correct (avg@k at budget B)."]
    return lines
