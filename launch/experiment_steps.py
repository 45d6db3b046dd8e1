"""Redundant and necessary steps in an experiment's held-out responses, for runs on testbed problems
(rl/data/testbed.py): what `reasonrl experiment` adds to its report when the held-out rows are testbed rows.

Per run (from <run>/heldout/step-N.jsonl, the responses the held-out evaluations keep): the mean number of redundant
steps per response and its distribution (0, 1, ... steps); the share of correct responses that kept every necessary
step, exactly as the reference solution writes it and, more loosely, as a line of the necessary form for every column
or partial product whatever its digits (an outcome reward does not check a step's digits); and, problem by problem,
how many responses lost or gained redundant steps against the start policy. Paired differences against the start
and against the reference method (the first config, same seed) come with 95% bootstrap intervals over problems;
pooled over seeds, each method also shows the spread of its per-seed means (the between-seed standard deviation),
which the problem-resampling intervals do not see.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from eval.stats import paired_difference_ci
from rewards.testbed import count_steps, is_testbed_row
from rl.config.schema import Config
from rl.store.metrics import METRICS_FILE, read_metrics

CURVE_KEY = "reward/testbed_redundancy"  # per-step mean redundancy rate of the training samples


def problem_rows(cfg: Config) -> dict[str, dict] | None:
    path = Path(cfg.data.eval or "")
    if path.suffix != ".jsonl" or not path.is_file():
        return None
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else None
        if isinstance(row, dict) and is_testbed_row(row):
            rows[str(row["id"])] = row
    return rows or None


def step_counts(run_dir: Path, step: int, rows: dict[str, dict]) -> dict[str, dict] | None:
    """{problem id: {redundant, necessary_kept, necessary_written, correct, tokens}} of one held-out evaluation, None
    if its responses were not kept."""
    path = Path(run_dir) / "heldout" / f"step-{step:06d}.jsonl"
    if not path.is_file():
        return None
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        row = rows.get(str(rec.get("id")))
        if row is None:
            continue
        c = count_steps(row, rec.get("completion", ""))
        out[str(rec["id"])] = {"redundant": c["redundant"], "necessary_kept": c["necessary_missing"] == 0,
                               "necessary_written": c["necessary"] >= c["necessary_expected"],
                               "correct": bool(rec.get("correct")), "tokens": rec.get("tokens")}
    return out


def _summary(counts: dict[str, dict]) -> dict:
    red = [c["redundant"] for c in counts.values()]
    correct = [c for c in counts.values() if c["correct"]]
    return {"n": len(red), "redundant_mean": float(np.mean(red)),
            "distribution": {str(k): red.count(k) for k in range(max(red) + 1)} if red else {},
            "necessary_kept_correct": float(np.mean([c["necessary_kept"] for c in correct])) if correct else None,
            "necessary_written_correct": float(np.mean([c["necessary_written"] for c in correct])) if correct else None}


def _paired(a: dict[str, dict], b: dict[str, dict]) -> tuple[list[float], list[float]]:
    ids = sorted(set(a) & set(b))
    return [a[i]["redundant"] for i in ids], [b[i]["redundant"] for i in ids]


def _moves(start: dict[str, dict], end: dict[str, dict]) -> dict:
    x, y = _paired(start, end)
    d = np.array(y) - np.array(x)
    return {"fewer": int((d < 0).sum()), "same": int((d == 0).sum()), "more": int((d > 0).sum())}


def _diff(a, b) -> dict:
    mean, lo, hi = paired_difference_ci(a, b)
    return {"mean": mean, "ci": [lo, hi]}


def steps_report(runs: list[tuple[str, Config]]) -> dict | None:
    """The steps section of an experiment report; None when the held-out rows are not testbed rows."""
    if not runs:
        return None
    rows = problem_rows(runs[0][1])
    if rows is None:
        return None
    loaded = []
    for method, cfg in runs:
        out = Path(cfg.trainer.output_dir)
        loaded.append((method, cfg.trainer.seed, step_counts(out, 0, rows),
                       step_counts(out, cfg.trainer.max_steps, rows)))
    # The start is shared by every method of a seed (the reference method evaluates it).
    starts = {seed: start for _, seed, start, _ in loaded if start}
    reference = runs[0][0]
    ends = {(m, s): e for m, s, _, e in loaded if e}
    per_run = []
    for method, seed, _, end in loaded:
        if end is None:
            continue
        row = {"method": method, "seed": seed, **_summary(end)}
        start = starts.get(seed)
        if start:
            row["start"] = _summary(start)
            row["vs_start"] = {**_diff(*_paired(start, end)), **_moves(start, end)}
        ref = ends.get((reference, seed))
        if method != reference and ref:
            row["vs_ref"] = _diff(*_paired(ref, end))
        per_run.append(row)
    return {"reference": reference, "runs": per_run, "pooled": _pool(per_run, loaded, starts, ends, reference)}


def _pool(per_run: list[dict], loaded, starts: dict, ends: dict, reference: str) -> list[dict]:
    pooled = []
    for method in dict.fromkeys(r["method"] for r in per_run):
        mine = [r for r in per_run if r["method"] == method]
        means = [r["redundant_mean"] for r in mine]
        dist: dict[str, int] = {}
        for r in mine:
            for k, v in r["distribution"].items():
                dist[k] = dist.get(k, 0) + v
        kept = [r["necessary_kept_correct"] for r in mine if r["necessary_kept_correct"] is not None]
        written = [r["necessary_written_correct"] for r in mine if r["necessary_written_correct"] is not None]
        p = {"method": method, "seeds": [r["seed"] for r in mine], "redundant_mean": float(np.mean(means)),
             "between_seed_std": float(np.std(means, ddof=1)) if len(means) > 1 else None, "distribution": dist,
             "necessary_kept_correct": float(np.mean(kept)) if kept else None,
             "necessary_written_correct": float(np.mean(written)) if written else None}
        pairs_start, pairs_ref = ([], []), ([], [])
        for r in mine:
            end = ends[(method, r["seed"])]
            if r["seed"] in starts:
                a, b = _paired(starts[r["seed"]], end)
                pairs_start[0].extend(a), pairs_start[1].extend(b)
            if method != reference and (reference, r["seed"]) in ends:
                a, b = _paired(ends[(reference, r["seed"])], end)
                pairs_ref[0].extend(a), pairs_ref[1].extend(b)
        if pairs_start[0]:
            p["vs_start"] = _diff(*pairs_start)
        if pairs_ref[0]:
            p["vs_ref"] = _diff(*pairs_ref)
        pooled.append(p)
    return pooled


def _d(x: dict | None) -> str:
    return "–" if not x else f"{x['mean']:+.2f} [{x['ci'][0]:+.2f}, {x['ci'][1]:+.2f}]"


def _kept(r: dict) -> str:
    if r["necessary_kept_correct"] is None:
        return "–"
    return f"{r['necessary_kept_correct']:.3f} / {r['necessary_written_correct']:.3f}"


def _dist(d: dict) -> str:
    return " / ".join(str(d.get(str(k), 0)) for k in range(8))


def markdown_steps(report: dict | None) -> str:
    if not report:
        return ""
    ref = report["reference"]
    lines = ["", "Redundant steps per held-out response (testbed rows; counted by rewards.testbed.count_steps):", "",
             f"| method | seed | redundant steps start → end | Δ vs start [CI] | Δ vs {ref} [CI] | responses with "
             "fewer / same / more than at start | distribution at end (0 / 1 / ... / 7 steps) | correct with every "
             "necessary step exact / written |", "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        start = r.get("start", {}).get("redundant_mean")
        moves = r.get("vs_start")
        lines.append(f"| {r['method']} | {r['seed']} | {'–' if start is None else format(start, '.2f')} → "
                     f"**{r['redundant_mean']:.2f}** | {_d(r.get('vs_start'))} | {_d(r.get('vs_ref'))} | "
                     + (f"{moves['fewer']} / {moves['same']} / {moves['more']}" if moves else "–")
                     + f" | {_dist(r['distribution'])} | "
                     + _kept(r) + " |")
    if len({r["seed"] for r in report["runs"]}) > 1:
        lines += ["", "Pooled over seeds (Δ: same-seed pairs pooled; spread: standard deviation of the per-seed "
                  "means):", "", f"| method | seeds | redundant steps (spread) | Δ vs start [CI] | Δ vs {ref} [CI] "
                  "| distribution (0 / ... / 7) | correct with every necessary step exact / written |",
                  "|---|---|---|---|---|---|---|"]
        for p in report["pooled"]:
            spread = p["between_seed_std"]
            lines.append(f"| {p['method']} | {', '.join(map(str, p['seeds']))} | **{p['redundant_mean']:.2f}** "
                         f"({'–' if spread is None else format(spread, '.2f')}) | {_d(p.get('vs_start'))} | "
                         f"{_d(p.get('vs_ref'))} | {_dist(p['distribution'])} | "
                         + _kept(p) + " |")
    return "\n".join(lines) + "\n"


def redundancy_curves(runs: list[tuple[str, Config]]) -> dict[str, list[tuple[int, float]]]:
    """Per method, the training samples' mean redundancy rate per step, averaged over the method's seeds."""
    by_method: dict[str, dict[int, list[float]]] = {}
    for method, cfg in runs:
        for row in read_metrics(Path(cfg.trainer.output_dir) / METRICS_FILE):
            if row.get(CURVE_KEY) is not None and "step" in row:
                by_method.setdefault(method, {}).setdefault(int(row["step"]), []).append(float(row[CURVE_KEY]))
    return {m: sorted((s, float(np.mean(v))) for s, v in steps.items()) for m, steps in by_method.items()}
