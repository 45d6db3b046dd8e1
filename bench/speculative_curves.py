"""GRPO with and without speculative rollouts from the same seeds (issue 26: speculation must not change what RL
learns). Reads finished run folders (metrics.jsonl, events.jsonl of `reasonrl train` / `reasonrl experiment`) and
prints, per run and per arm: held-out greedy accuracy at the end with its 95% interval, training accuracy and
response tokens over the last 50 steps, generation seconds, and the drafting statistics; draws the smoothed
training curves of both arms into one figure.

    python bench/speculative_curves.py --plain results/testbed2/testbed2_grpo{,-seed1,-seed2} \
        --spec results/testbed2_spec/testbed2_grpo{,-seed1,-seed2} --figure docs/figures/testbed_speculation.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_run(folder: Path) -> dict:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [json.loads(x) for x in (folder / "events.jsonl").read_text().splitlines() if '"event": "eval"' in x]
    return {"rows": rows, "eval_end": max(evals, key=lambda e: e["step"]) if evals else None}


def summarize_run(run: dict, tail: int = 50) -> dict:
    from eval.stats import bootstrap_ci

    rows, last = run["rows"], run["rows"][-tail:]
    out = {"steps": len(rows), "train_acc_last": statistics.mean(r["accuracy"] for r in last),
           "tokens_last": statistics.mean(r["response_tokens_mean"] for r in last),
           "time_generate": sum(r["time_generate"] for r in rows), "time_step": sum(r["time_step"] for r in rows)}
    spec = [r["spec_acceptance_rate"] for r in rows if r.get("spec_acceptance_rate") is not None]
    if spec:
        out["acceptance"] = statistics.mean(spec)
        out["tokens_per_forward"] = statistics.mean(r["spec_tokens_per_forward"] for r in rows
                                                    if r.get("spec_tokens_per_forward") is not None)
    end = run["eval_end"]
    if end is not None:
        out["heldout_acc"] = end["accuracy"]
        out["heldout_ci"] = list(bootstrap_ci(end["correct"]))
        out["heldout_tokens"] = end["response_tokens_mean"]
    return out


def smooth(xs: list[float], k: int = 10) -> list[float]:
    return [statistics.mean(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def figure(arms: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for (name, runs), color in zip(arms.items(), ("tab:blue", "tab:orange")):
        for i, run in enumerate(runs):
            steps = [r["step"] for r in run["rows"]]
            for ax, key in zip(axes, ("accuracy", "response_tokens_mean")):
                ax.plot(steps, smooth([r[key] for r in run["rows"]]), color=color, alpha=0.8,
                        label=name if i == 0 else None)
    for ax, title in zip(axes, ("training accuracy (10-step mean)", "response tokens (10-step mean)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plain", nargs="+", required=True, help="run folders trained without speculation")
    ap.add_argument("--spec", nargs="+", required=True, help="run folders trained with it (same seeds, same order)")
    ap.add_argument("--figure", default=None)
    ap.add_argument("--out", default=None, help="write the summaries as JSON here")
    args = ap.parse_args()
    arms = {"plain": [load_run(Path(p)) for p in args.plain], "speculative": [load_run(Path(p)) for p in args.spec]}
    summary = {name: [summarize_run(r) for r in runs] for name, runs in arms.items()}
    print(f"{'arm':<12} {'run':>3} {'held-out acc [95% CI]':>24} {'train acc':>9} {'tokens':>7} {'generate s':>10} "
          f"{'step s':>7} {'accept':>6}")
    for name, rows in summary.items():
        for i, s in enumerate(rows):
            ci = s.get("heldout_ci", [float("nan")] * 2)
            print(f"{name:<12} {i:>3} {s.get('heldout_acc', float('nan')):>7.3f} [{ci[0]:.3f}, {ci[1]:.3f}]     "
                  f"{s['train_acc_last']:>9.3f} {s['tokens_last']:>7.1f} {s['time_generate']:>10.1f} "
                  f"{s['time_step']:>7.1f} {s.get('acceptance', float('nan')):>6.3f}")
    if args.figure:
        figure(arms, Path(args.figure))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
