"""Redundancy beside length, for evals on testbed problems (rl/data/testbed.py): per record the steps rewards.testbed's
counter finds, per benchmark their means, and a small Markdown table.

A record carries `redundant_steps` / `necessary_steps` only when its problem row came from the testbed (a `testbed`
column with the operands), so other benchmarks' metrics are unchanged.
"""
from __future__ import annotations

import numpy as np


def record_fields(row: dict, completion: str) -> dict:
    """What a testbed row adds to one eval record ({} for any other row)."""
    # Imported here: the rest of this module is pure numpy, and eval.metrics (no verifier imports) uses it.
    from rewards.testbed import count_steps, is_testbed_row

    if not is_testbed_row(row):
        return {}
    c = count_steps(row, completion)
    out = {"redundant_steps": c["redundant"], "necessary_steps": c["necessary"],
           "necessary_correct": c["necessary_correct"], "redundant_kinds": c["redundant_kinds"]}
    if row.get("minimal_tokens") is not None:
        out["minimal_tokens"] = int(row["minimal_tokens"])
    return out


def redundancy_metrics(records: list[dict]) -> dict:
    """Means over the records that carry step counts: `redundancy_rate` (redundant / (necessary + redundant) per
    response, 0 for a response with neither), steps per response, and tokens / minimal tokens. {} if none do."""
    recs = [r for r in records if "redundant_steps" in r and "necessary_steps" in r]
    if not recs:
        return {}
    red = np.array([r["redundant_steps"] for r in recs], dtype=float)
    nec = np.array([r["necessary_steps"] for r in recs], dtype=float)
    rate = np.divide(red, red + nec, out=np.zeros_like(red), where=(red + nec) > 0)
    out = {"redundancy_rate": float(rate.mean()), "redundant_steps_mean": float(red.mean()),
           "necessary_steps_mean": float(nec.mean())}
    correct = [bool(r["correct"]) for r in recs]
    if any(correct):
        out["redundancy_rate_correct"] = float(rate[np.array(correct)].mean())
    if all("necessary_correct" in r for r in recs):
        out["necessary_correct_mean"] = float(np.mean([r["necessary_correct"] for r in recs]))
    ratios = [r["tokens"] / r["minimal_tokens"] for r in recs if r.get("minimal_tokens")]
    if ratios:
        out["tokens_over_minimal"] = float(np.mean(ratios))
    return out


def markdown(results: dict[str, dict]) -> str:
    """A second results table for the benchmarks with step counts ('' when none has them)."""
    rows = {name: m for name, m in results.items() if "redundancy_rate" in m}
    if not rows:
        return ""
    lines = ["", "| benchmark | redundancy rate % | redundant / necessary steps per response | "
             "necessary steps correct | tokens / minimal |", "|---|---|---|---|---|"]
    for name, m in rows.items():
        ratio = m.get("tokens_over_minimal")
        lines.append(f"| {name} | {100 * m['redundancy_rate']:.1f} | {m['redundant_steps_mean']:.2f} / "
                     f"{m['necessary_steps_mean']:.2f} | {m.get('necessary_correct_mean', float('nan')):.2f} | "
                     f"{'-' if ratio is None else format(ratio, '.2f')} |")
    return "\n".join(lines) + "\n"
