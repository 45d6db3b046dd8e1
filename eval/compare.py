"""`reasonrl compare A B`: is B as accurate as A with fewer tokens? Paired over the problems both evals answered.

Per benchmark: accuracy difference B - A with a paired bootstrap interval (problems resampled jointly, so the
problem-difficulty variance A and B share cancels), the token ratio mean(B) / mean(A) with its paired interval
(the compression), and a verdict line. Writes results.json, compare.md and PNGs (eval.plots).
"""
from __future__ import annotations

import json
from pathlib import Path

from eval.metrics import benchmark_metrics, per_problem_means
from eval.runner import SAMPLES_DIR, SETTINGS_FILE, read_samples
from eval.stats import paired_difference_ci, paired_ratio_ci
from rl.data.loading import DataError
from rl.store.atomic import write_atomic

# Settings that make two evals measure different things (greedy vs sampled decoding, budget and answer extraction
# are the usual reasons an in-training score and an offline one disagree); a difference is reported, not hidden.
_COMPARABLE = ("greedy", "temperature", "top_p", "max_new_tokens", "samples", "system_prompt", "prompt_suffix",
               "verifier")


def load_eval(folder: str | Path) -> tuple[dict, dict[str, list[dict]]]:
    """(eval_config.json, {benchmark: records}) of an eval output folder."""
    folder = Path(folder)
    if not (folder / SETTINGS_FILE).is_file():
        raise DataError(f"{folder} is not an eval folder (no {SETTINGS_FILE}); make one with `reasonrl eval`")
    meta = json.loads((folder / SETTINGS_FILE).read_text())
    records = {}
    for name in meta.get("benchmarks", {}):
        recs = read_samples(folder / SAMPLES_DIR / f"{name}.jsonl")
        if recs:
            records[name] = recs
    return meta, records


def verdict(name: str, ratio: tuple[float, float, float], diff: tuple[float, float, float]) -> str:
    r, rlo, rhi = ratio
    d, dlo, dhi = (100 * x for x in diff)
    length = f"{abs(1 - r) * 100:.0f}% {'shorter' if r < 1 else 'longer'}" if abs(1 - r) >= 0.005 else "as long"
    same = " (no significant difference)" if dlo <= 0 <= dhi else (" (B better)" if dlo > 0 else " (B worse)")
    return (f"{name}: B is {length} (tokens x{r:.2f} [{rlo:.2f}, {rhi:.2f}]), accuracy {d:+.1f} pts "
            f"[{dlo:+.1f}, {dhi:+.1f}]{same}")


def compare(a_dir: str | Path, b_dir: str | Path, out: str | Path | None = None, *, confidence: float = 0.95,
            n_boot: int = 10_000, seed: int = 0, plots: bool = True) -> dict:
    meta_a, rec_a = load_eval(a_dir)
    meta_b, rec_b = load_eval(b_dir)
    common = [n for n in rec_a if n in rec_b]
    if not common:
        raise DataError(f"{a_dir} ({sorted(rec_a)}) and {b_dir} ({sorted(rec_b)}) share no benchmark")
    out = Path(out) if out else Path(b_dir) / f"compare_vs_{Path(a_dir).resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    warnings = [f"{k} differs: A {meta_a.get(k)!r}, B {meta_b.get(k)!r}" for k in _COMPARABLE
                if meta_a.get(k) != meta_b.get(k)]
    results = {"a": str(a_dir), "b": str(b_dir), "model_a": meta_a.get("model"), "model_b": meta_b.get("model"),
               "confidence": confidence, "warnings": warnings, "benchmarks": {}}
    for name in common:
        pa, pb = per_problem_means(rec_a[name]), per_problem_means(rec_b[name])
        ids = [i for i in pa if i in pb]
        if not ids:
            warnings.append(f"{name}: no problem id in common")
            continue
        if len(ids) < max(len(pa), len(pb)):
            warnings.append(f"{name}: paired on the {len(ids)} problems both answered (A {len(pa)}, B {len(pb)})")
        acc_a, acc_b = [pa[i][0] for i in ids], [pb[i][0] for i in ids]
        tok_a, tok_b = [pa[i][1] for i in ids], [pb[i][1] for i in ids]
        diff = paired_difference_ci(acc_a, acc_b, confidence=confidence, n_boot=n_boot, seed=seed)
        ratio = paired_ratio_ci(tok_a, tok_b, confidence=confidence, n_boot=n_boot, seed=seed)
        keep = set(ids)
        results["benchmarks"][name] = {
            "problems": len(ids),
            "a": benchmark_metrics([r for r in rec_a[name] if str(r["problem_id"]) in keep], confidence=confidence,
                                   n_boot=n_boot, seed=seed, budget=meta_a.get("max_new_tokens")),
            "b": benchmark_metrics([r for r in rec_b[name] if str(r["problem_id"]) in keep], confidence=confidence,
                                   n_boot=n_boot, seed=seed, budget=meta_b.get("max_new_tokens")),
            "accuracy_diff": diff[0], "accuracy_diff_ci": [diff[1], diff[2]],
            "token_ratio": ratio[0], "token_ratio_ci": [ratio[1], ratio[2]],
            "verdict": verdict(name, ratio, diff),
        }
    table = markdown(results)
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(out / "compare.md", table)
    if plots:
        from eval.plots import accuracy_at_budget, accuracy_vs_tokens, token_histogram

        results["plots"] = []
        for name in results["benchmarks"]:
            results["plots"].append(str(token_histogram(rec_a[name], rec_b[name], name, out / f"tokens_{name}.png")))
            results["plots"].append(str(accuracy_vs_tokens(rec_a[name], rec_b[name], name,
                                                           out / f"accuracy_vs_tokens_{name}.png")))
            r = results["benchmarks"][name]  # every compared model on one frontier plot
            results["plots"].append(str(accuracy_at_budget(
                {"A": r["a"]["accuracy_at_budget"], "B": r["b"]["accuracy_at_budget"]}, name,
                out / f"accuracy_at_budget_{name}.png")))
        write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    results["out"] = str(out)
    return results


def markdown(results: dict) -> str:
    c = int(round(100 * results["confidence"]))
    lines = [f"A = `{results['model_a']}` ({results['a']}), B = `{results['model_b']}` ({results['b']})", "",
             f"| benchmark | problems | acc A % | acc B % | B - A pts [{c}% CI] | tokens A | tokens B | "
             f"B/A tokens [{c}% CI] | ACT A | ACT B |", "|" + "|".join(["---"] * 10) + "|"]
    for name, r in results["benchmarks"].items():
        a, b = r["a"], r["b"]
        lo, hi = r["accuracy_diff_ci"]
        rlo, rhi = r["token_ratio_ci"]
        lines.append(f"| {name} | {r['problems']} | {100 * a['accuracy']:.1f} | {100 * b['accuracy']:.1f} | "
                     f"{100 * r['accuracy_diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | {a['tokens']['mean']:.0f} | "
                     f"{b['tokens']['mean']:.0f} | {r['token_ratio']:.2f} [{rlo:.2f}, {rhi:.2f}] | "
                     f"{a['act']:.2f} | {b['act']:.2f} |")
    lines.append("")
    lines += [r["verdict"] for r in results["benchmarks"].values()]
    if results["warnings"]:
        lines += ["", "Warnings:"] + [f"- {w}" for w in results["warnings"]]
    return "\n".join(lines) + "\n"
