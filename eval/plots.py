"""PNGs for `reasonrl compare`: response-length histograms of A vs B, and accuracy against tokens per problem."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.metrics import per_problem_means
from eval.stats import bootstrap_ci


def _figure():
    # Figure + savefig without pyplot renders with Agg and leaves the process-wide backend alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    return fig, fig.add_subplot()


def token_histogram(rec_a: list[dict], rec_b: list[dict], name: str, path: Path) -> Path:
    """Response tokens of every sample, A and B on shared bins, with their means marked."""
    ta, tb = [r["tokens"] for r in rec_a], [r["tokens"] for r in rec_b]
    fig, ax = _figure()
    bins = np.histogram_bin_edges(ta + tb, bins=min(40, max(5, len(set(ta + tb)))))
    for tokens, label, color in ((ta, "A", "tab:blue"), (tb, "B", "tab:orange")):
        ax.hist(tokens, bins=bins, alpha=0.5, color=color, label=f"{label} (mean {np.mean(tokens):.0f})")
        ax.axvline(np.mean(tokens), color=color, linestyle="--", linewidth=1.5)
    ax.set_xlabel("response tokens")
    ax.set_ylabel("responses")
    ax.set_title(f"{name}: response length")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def accuracy_vs_tokens(rec_a: list[dict], rec_b: list[dict], name: str, path: Path) -> Path:
    """One small point per problem (mean tokens, accuracy over its samples) and one large point per model with
    its bootstrap accuracy interval: a compressed model moves left without moving down."""
    fig, ax = _figure()
    for recs, label, color in ((rec_a, "A", "tab:blue"), (rec_b, "B", "tab:orange")):
        per = per_problem_means(recs)
        acc = np.array([v[0] for v in per.values()])
        tok = np.array([v[1] for v in per.values()])
        ax.scatter(tok, acc, s=12, alpha=0.35, color=color)
        lo, hi = bootstrap_ci(acc, n_boot=2000)
        ax.errorbar([tok.mean()], [acc.mean()], yerr=[[acc.mean() - lo], [hi - acc.mean()]], fmt="o", markersize=9,
                    color=color, capsize=4, label=f"{label}: {100 * acc.mean():.1f}% at {tok.mean():.0f} tokens")
    ax.set_xlabel("mean response tokens (per problem)")
    return _save_accuracy_plot(fig, ax, f"{name}: accuracy vs tokens", path)


def accuracy_at_budget(curves: dict[str, dict[str, float]], name: str, path: Path) -> Path:
    """One line per model ({label: accuracy_at_budget}) against the budget on a log2 axis: a method that only
    truncates moves along the curve, one that compresses moves it up and left."""
    from matplotlib import colormaps

    fig, ax = _figure()
    colors = colormaps["tab10"].colors
    # Every curve is drawn: colours cycle through tab10, and each further round of ten changes marker and line
    # style, so the 11th model is not mistaken for the 1st.
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
    for i, (label, curve) in enumerate(curves.items()):
        xs = sorted(int(b) for b in curve)
        ys = [curve[str(b)] for b in xs]
        marker, linestyle = styles[(i // len(colors)) % len(styles)]
        ax.plot(xs, ys, marker=marker, linestyle=linestyle, color=colors[i % len(colors)],
                label=f"{label} ({100 * ys[-1]:.1f}% at {xs[-1]})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token budget B (response finished within B tokens)")
    return _save_accuracy_plot(fig, ax, f"{name}: accuracy at budget", path)


def _save_accuracy_plot(fig, ax, title: str, path: Path) -> Path:
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
