"""Grouping runs over seeds (mean ± std, n), the threshold table, and the PPL / compute Pareto front."""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ease.results.collect import CURVE_METRICS

# Metrics averaged over seeds in results_groups.csv.
AGGREGATED = (
    "ppl",
    "acc",
    "shallow_ratio",
    "compute_cost",
    "loss",
    "test_ppl",
    "epochs_run",
    "train_time_s",
    "feasible",
)


def _sort_key(value: Any) -> tuple[int, Any]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value))
    return (1, str(value))


def _sorted(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    if df.empty or not columns:
        return df.reset_index(drop=True)
    keys = df[list(columns)].apply(lambda r: tuple(_sort_key(v) for v in r), axis=1)
    return df.loc[keys.sort_values().index].reset_index(drop=True)


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that count in tables: status ok (not failed, objective finite)."""
    return runs[runs["status"] == "ok"] if not runs.empty else runs


def pruned(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs a sweep's pruner stopped: listed apart, neither finished nor failed."""
    return runs[runs["status"] == "pruned"] if not runs.empty else runs


def failed(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that neither finished nor were pruned (failed, interrupted, non-finite)."""
    return runs[~runs["status"].isin(["ok", "pruned"])] if not runs.empty else runs


def group_runs(runs: pd.DataFrame, params: Sequence[str]) -> pd.DataFrame:
    """Runs that differ only in seed -> one row: the params, n, seeds, <metric>_mean and <metric>_std.

    std is the sample standard deviation (ddof=1); NaN for a group of one.
    """
    done = finished(runs)
    if done.empty:
        return pd.DataFrame()
    weight_cols = sorted((c for c in done.columns if c.startswith("weight_L")), key=lambda c: int(c[8:]))
    rows = []
    for group, part in done.groupby("group", sort=False, dropna=False):
        row: dict[str, Any] = {"group": group, **{p: part[p].iloc[0] for p in params}}
        row["n"] = len(part)
        row["seeds"] = " ".join(str(s) for s in sorted(part["seed"].dropna().tolist()))
        for col in weight_cols:
            row[col] = part[col].iloc[0]
        for metric in AGGREGATED:
            values = part[metric].astype(float)
            row[f"{metric}_mean"] = values.mean()
            row[f"{metric}_std"] = values.std(ddof=1) if values.notna().sum() > 1 else math.nan
        rows.append(row)
    return _sorted(pd.DataFrame(rows), params)


def curve_params(runs: pd.DataFrame, params: Sequence[str]) -> list[str]:
    """Params that can change a run's threshold curve: an eval run's own routing.threshold cannot."""
    evals_only = not runs.empty and (runs["task"] == "eval").all()
    return [p for p in params if not (evals_only and p == "routing.threshold")]


def threshold_table(runs: pd.DataFrame, params: Sequence[str]) -> pd.DataFrame:
    """The threshold table from every finished run's recorded curve, mean/std over seeds per (group, threshold).

    Eval runs of one checkpoint at several thresholds record the same curve: it counts once.
    """
    done = finished(runs)
    if done.empty or "_curve" not in done:
        return pd.DataFrame()
    keep = curve_params(done, params)
    rows, seen = [], set()
    for _, run in done.iterrows():
        if not run["_curve"]:
            continue
        key = tuple(str(run[p]) for p in keep)
        source = run["_checkpoint"] if isinstance(run["_checkpoint"], str) else run["run"]
        identity = (key, run["seed"], source)
        if identity in seen:
            continue
        seen.add(identity)
        for point in run["_curve"]:
            threshold = point.get("threshold")
            threshold = threshold if isinstance(threshold, (int, float)) else str(threshold)
            rows.append({"_key": key, **{p: run[p] for p in keep}, "threshold": threshold, **point})
    if not rows:
        return pd.DataFrame()
    points = pd.DataFrame(rows)
    points["threshold"] = points["threshold"].astype(object)
    out = []
    for (_, threshold), part in points.groupby(["_key", "threshold"], sort=False):
        row = {**{p: part[p].iloc[0] for p in keep}, "threshold": threshold, "n": len(part)}
        for metric in CURVE_METRICS:
            values = part[metric].astype(float) if metric in part else pd.Series([math.nan])
            row[f"{metric}_mean"] = values.mean()
            row[f"{metric}_std"] = values.std(ddof=1) if values.notna().sum() > 1 else math.nan
        out.append(row)
    return _sorted(pd.DataFrame(out), [*keep, "threshold"])


def pareto_mask(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """True where no other point is at least as good in both (lower x, lower y) and better in one."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    mask = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        mask[i] = not dominated.any()
    return mask


def pareto_front(groups: pd.DataFrame) -> pd.DataFrame:
    """The groups no other group beats in both mean PPL and mean compute cost, cheapest first."""
    if groups.empty:
        return groups
    mask = pareto_mask(groups["compute_cost_mean"], groups["ppl_mean"])
    return groups[mask].sort_values("compute_cost_mean").reset_index(drop=True)


# --- methods at equal compute (each run's compute_grid record, ease.comparison) ------------------------------

# Per grid level: column -> path inside the level's record; all on the TEST split except the calibration target.
GRID_METRICS: dict[str, tuple[str, ...]] = {
    "test_ppl": ("test", "ppl"),
    "test_acc": ("test", "acc"),
    "test_compute_cost": ("test", "compute_cost"),
    "val_compute_cost": ("val_compute_cost",),
    "tokens_per_s": ("decode", "tokens_per_s"),
    "full_depth_tokens_per_s": ("decode", "full_depth_tokens_per_s"),
    "speedup": ("decode", "speedup"),
    "decode_compute_cost": ("decode", "decode_compute_cost"),
}


def _level_value(point: dict[str, Any], path: Sequence[str]) -> float:
    value: Any = point
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def grid_points(runs: pd.DataFrame, params: Sequence[str]) -> pd.DataFrame:
    """One row per (finished run, grid level): the params, group, seed, target, reachable, fixed, GRID_METRICS."""
    done = finished(runs)
    if done.empty or "_grid" not in done:
        return pd.DataFrame()
    rows = []
    for _, run in done.iterrows():
        for point in run["_grid"] or []:
            target = _level_value(point, ("target",))
            if not math.isfinite(target):
                continue
            reachable = bool(point.get("reachable"))
            row = {"group": run["group"], **{p: run[p] for p in params}, "seed": run["seed"], "run": run["run"]}
            row.update(target=round(target, 6), reachable=reachable, fixed=bool(point.get("fixed")))
            row.update({c: _level_value(point, path) if reachable else math.nan for c, path in GRID_METRICS.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def grid_table(runs: pd.DataFrame, params: Sequence[str], baseline_group: str | None = None) -> pd.DataFrame:
    """Methods at equal compute: per (group, level) mean/std over seeds of GRID_METRICS, n (runs that reached
    the level), n_unreachable, fixed; and test PPL against `baseline_group` at the same level (Welch's t-test,
    Holm over the groups compared at that level; ease.results.significance)."""
    from ease.results.significance import holm, welch_p

    points = grid_points(runs, params)
    if points.empty:
        return pd.DataFrame()
    rows = []
    for (group, target), part in points.groupby(["group", "target"], sort=False):
        reached = part[part["reachable"]]
        row: dict[str, Any] = {"group": group, **{p: part[p].iloc[0] for p in params}, "target": target}
        row.update(n=len(reached), n_unreachable=int((~part["reachable"]).sum()), fixed=bool(part["fixed"].any()))
        for metric in GRID_METRICS:
            values = reached[metric].astype(float)
            row[f"{metric}_mean"] = values.mean() if values.notna().any() else math.nan
            row[f"{metric}_std"] = values.std(ddof=1) if values.notna().sum() > 1 else math.nan
        row["_ppl"] = reached["test_ppl"].astype(float).dropna().to_numpy()
        rows.append(row)
    first = {group: i for i, group in enumerate(dict.fromkeys(points["group"]))}  # the runs' order: the sweep's
    table = pd.DataFrame(rows)
    table = table.sort_values("target", kind="stable")
    table = table.sort_values("group", key=lambda g: g.map(first), kind="stable").reset_index(drop=True)
    table["baseline"] = table["group"] == baseline_group
    table["ppl_p"] = math.nan
    if baseline_group is not None and table["baseline"].any():
        for _, level in table.groupby("target", sort=False):
            base = level[level["baseline"]]
            if base.empty:
                continue
            others = level[~level["baseline"]]
            p = [welch_p(values, base["_ppl"].iloc[0]) for values in others["_ppl"]]
            table.loc[others.index, "ppl_p"] = p
            table.loc[others.index, "ppl_p_holm"] = holm(p) if p else []
    if "ppl_p_holm" not in table:
        table["ppl_p_holm"] = math.nan
    return table.drop(columns=["_ppl"])
