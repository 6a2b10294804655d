"""The PNG plots: PPL vs compute with the Pareto front, and PPL / compute against the routing threshold."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ease.io import atomic_write
from ease.results.group import finished, pareto_front, pareto_mask
from ease.results.tables import group_label


def _pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend, imported only when a plot is drawn (it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """Write `fig` to `path` as a PNG atomically (a reader never sees half a plot), then free it."""
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    _pyplot().close(fig)


def plot_pareto(runs: pd.DataFrame, groups: pd.DataFrame, params: Sequence[str], path: Path) -> None:
    """ppl_vs_compute.png: every finished run, the group means ± std, and the Pareto front of the groups."""
    plt = _pyplot()
    done = finished(runs)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(100 * done["compute_cost"], done["ppl"], s=14, alpha=0.35, color="gray", label="runs")
    if not groups.empty:
        ax.errorbar(
            100 * groups["compute_cost_mean"], groups["ppl_mean"],
            xerr=100 * groups["compute_cost_std"].fillna(0), yerr=groups["ppl_std"].fillna(0),
            fmt="o", color="tab:blue", ms=5, capsize=2, label="group mean ± std",
        )  # fmt: skip
        front = pareto_front(groups)
        ax.plot(100 * front["compute_cost_mean"], front["ppl_mean"], "-", color="tab:red", lw=1.5, label="Pareto front")
        ax.scatter(100 * front["compute_cost_mean"], front["ppl_mean"], s=60, facecolors="none", edgecolors="tab:red")
        if len(groups) <= 12:
            for _, row in groups.iterrows():
                ax.annotate(group_label(row, params), (100 * row["compute_cost_mean"], row["ppl_mean"]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("compute cost (% of layers)")
    ax.set_ylabel("PPL")
    ax.set_title("PPL vs compute")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_threshold_curves(thresholds: pd.DataFrame, params: Sequence[str], path: Path) -> None:
    """threshold_curves.png: PPL and compute (mean ± std over seeds) against the routing threshold, per group."""
    plt = _pyplot()
    fig, (ax_ppl, ax_cost) = plt.subplots(1, 2, figsize=(10, 4))
    scalar = thresholds[thresholds["threshold"].map(lambda t: isinstance(t, (int, float)))]
    keep = [p for p in params if p in scalar.columns]
    parts = scalar.groupby([scalar[p].astype(str) for p in keep], sort=False) if keep else [("", scalar)]
    for _, part in parts:
        part = part.sort_values("threshold")
        name = group_label(part.iloc[0], keep)
        t = part["threshold"].astype(float)
        for ax, metric, scale in ((ax_ppl, "ppl", 1.0), (ax_cost, "compute_cost", 100.0)):
            mean, std = scale * part[f"{metric}_mean"], scale * part[f"{metric}_std"].fillna(0)
            (line,) = ax.plot(t, mean, marker="o", ms=3, label=name)
            ax.fill_between(t, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)  # ± std over seeds
    ax_ppl.set(xlabel="routing threshold", ylabel="PPL", title="PPL vs threshold")
    ax_cost.set(xlabel="routing threshold", ylabel="compute cost (%)", title="Compute vs threshold")
    ax_ppl.legend(fontsize=7)
    _save(fig, path)


def plot_methods_pareto(grid: pd.DataFrame, params: Sequence[str], path: Path) -> None:
    """methods_pareto.png: test PPL against the achieved test compute cost, one marker and line per method over
    its grid levels (mean ± std over seeds), hollow where the cost is fixed; the front over every point in red."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    reached = grid[grid["n"] > 0]
    markers = "osD^v<>phX*"
    for i, (_, part) in enumerate(reached.groupby("group", sort=False)):
        x, y = 100 * part["test_compute_cost_mean"], part["test_ppl_mean"]
        (line,) = ax.plot(x, y, "-", lw=1, alpha=0.6)
        face = ["none" if fixed else line.get_color() for fixed in part["fixed"]]
        ax.errorbar(
            x, y, xerr=100 * part["test_compute_cost_std"].fillna(0), yerr=part["test_ppl_std"].fillna(0),
            fmt="none", ecolor=line.get_color(), capsize=2, lw=1,
        )  # fmt: skip
        ax.scatter(x, y, marker=markers[i % len(markers)], s=36, facecolors=face, edgecolors=line.get_color(),
                   label=group_label(part.iloc[0], params))  # fmt: skip
    if not reached.empty:
        mask = pareto_mask(reached["test_compute_cost_mean"], reached["test_ppl_mean"])
        front = reached[mask].sort_values("test_compute_cost_mean")
        ax.plot(100 * front["test_compute_cost_mean"], front["test_ppl_mean"], "--", color="tab:red", lw=1.5,
                label="Pareto front")  # fmt: skip
        ax.scatter(100 * front["test_compute_cost_mean"], front["test_ppl_mean"], s=110, facecolors="none",
                   edgecolors="tab:red")  # fmt: skip
    ax.set_xlabel("achieved compute cost on test (% of layers)")
    ax.set_ylabel("test PPL")
    ax.set_title("Methods at equal compute (test split, mean ± std over seeds)")
    ax.legend(fontsize=7)
    _save(fig, path)
