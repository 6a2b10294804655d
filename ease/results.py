"""Comparison tables and plots from run records: `python -m ease.results DIR [DIR...]` (or `ease-results`).

Every metrics.json under the folders becomes one row of a pandas DataFrame (overrides, swept parameters,
metrics, status, seed). Runs whose overrides differ only in the seed form a group, reported as mean ± std over
its n seeds. Written into the output folder:
  results.csv          one row per run, failed runs included (status, error)
  results_groups.csv   one row per group: n, and <metric>_mean / <metric>_std
  results.md           seed 003's layouts: α | L1 weight | L3 weight | PPL | Shallow% | Compute%, the threshold
                       table (from each run's recorded curve), the Pareto front of PPL vs compute, failed runs,
                       and the files that could not be read
  ppl_vs_compute.png   every run and group mean, the Pareto front marked
  threshold_curves.png PPL and compute against the routing threshold, one line per group
Corrupt or half-written metrics.json files are reported (log warning and results.md) and skipped.
"""

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("ease.results")

METRICS_FILE = "metrics.json"
# Run columns read from a record's metrics: column -> path inside `metrics`.
METRIC_PATHS: dict[str, tuple[str, ...]] = {
    "ppl": ("ppl",),
    "acc": ("acc",),
    "shallow_ratio": ("shallow_ratio",),
    "compute_cost": ("compute_cost",),
    "loss": ("loss",),
    "routed_loss": ("routed_loss",),
    "test_ppl": ("test", "ppl"),
    "test_acc": ("test", "acc"),
    "epochs_run": ("epochs_run",),
    "best_epoch": ("best_epoch",),
    "train_time_s": ("train_time_s",),
    "eval_time_s": ("eval_time_s",),
    "tokens_per_s": ("tokens_per_s",),
    "num_parameters": ("num_parameters",),
}
# Metrics averaged over seeds in results_groups.csv.
AGGREGATED = ("ppl", "acc", "shallow_ratio", "compute_cost", "loss", "test_ppl", "epochs_run", "train_time_s")
# Overrides that do not change a result: runs differing only in these belong to one group.
NOT_SETTINGS = frozenset({"seed", "threads", "progress", "debug", "save_checkpoint"})
LABELS = {
    "loss_weights.alpha": "α",
    "loss_weights": "Loss weights",
    "loss_weights.middle": "Middle weight",
    "lr_scales": "LR scales",
    "routing.threshold": "Threshold",
    "routing.exit_layer": "Exit layer",
    "routing": "Routing",
    "strategy.hard_example_ratio": "Hard ratio",
    "strategy": "Strategy",
    "schedule": "α schedule",
    "checkpoint": "Checkpoint",
}


@dataclass
class Results:
    """What `write_results` found and wrote."""

    runs: pd.DataFrame  # one row per readable run record
    groups: pd.DataFrame  # one row per group of finished runs (mean/std over seeds)
    thresholds: pd.DataFrame  # the threshold table, one row per (group, threshold)
    pareto: pd.DataFrame  # the groups on the PPL / compute Pareto front
    params: list[str]  # the swept settings (override keys whose value varies between runs)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) for unreadable records
    missing: list[str] = field(default_factory=list)  # run folders without a metrics.json
    markdown: str = ""
    files: list[Path] = field(default_factory=list)


# --- reading ------------------------------------------------------------------------------------------------


def parse_value(text: str | None) -> Any:
    """An override's value as a number or bool where it reads as one, else the text."""
    if text is None:
        return None
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_override(override: str) -> tuple[str, str | None]:
    """`+key=value` / `key=value` / `~key` -> (key, value text or None)."""
    key, _, value = override.lstrip("+~").partition("=")
    return key.strip(), (value.strip() if "=" in override else None)


def read_record(path: Path) -> dict[str, Any]:
    """One metrics.json; raises ValueError saying why it is unusable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(record, dict) or "status" not in record:
        raise ValueError("not an EASE run record (no status)")
    if not isinstance(record.get("metrics") or {}, dict):
        raise ValueError("metrics is not a mapping")
    return record


def _natural(path: Path) -> list[Any]:
    """Sort key that puts job 2 before job 10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


def find_run_files(dirs: Iterable[str | Path]) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(root, metrics.json) for every record under `dirs`, and run folders (with .hydra/) that have none."""
    found, missing = [], []
    for root in dirs:
        root = Path(root)
        if root.is_file() and root.name == METRICS_FILE:
            found.append((root.parent, root))
            continue
        if not root.is_dir():
            log.warning("no such folder: %s", root)
            continue
        found += [(root, p) for p in sorted(root.rglob(METRICS_FILE), key=_natural)]
        for hydra_dir in sorted(root.rglob(".hydra")):
            if not (hydra_dir.parent / METRICS_FILE).exists():
                missing.append(str(hydra_dir.parent))
    return found, missing


def _get(mapping: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _status(record: dict[str, Any]) -> str:
    """ok, failed, or nan (finished, but the objective it returned was not finite: Optuna's FAIL)."""
    if record["status"] != "ok":
        return str(record["status"])
    values = (record.get("objective") or {}).get("values") or []
    return "nan" if any(not math.isfinite(_number(v)) for v in values) else "ok"


def record_row(record: dict[str, Any], name: str) -> dict[str, Any]:
    """The run's row: metadata, every override as `override:KEY`, metrics, layer weights."""
    metrics = record.get("metrics") or {}
    overrides = [str(o) for o in record.get("overrides") or []]
    settings = {}
    for override in overrides:
        key, value = parse_override(override)
        if key and key not in NOT_SETTINGS:
            settings[key] = value
    row: dict[str, Any] = {
        "run": name,
        "status": _status(record),
        "error": record.get("error") or ("objective not finite" if _status(record) == "nan" else None),
        "task": record.get("task"),
        "seed": record.get("seed"),
        "group": " ".join(f"{k}={v}" if v is not None else f"~{k}" for k, v in sorted(settings.items())),
        "overrides": " ".join(overrides),
    }
    row.update({f"override:{k}": v for k, v in settings.items()})
    row.update({col: _number(_get(metrics, path)) for col, path in METRIC_PATHS.items()})
    for layer, weight in (metrics.get("layer_weights") or {}).items():
        row[f"weight_L{layer}"] = _number(weight)
    curve = metrics.get("threshold_analysis")
    row["_curve"] = curve if isinstance(curve, list) else None
    row["_checkpoint"] = metrics.get("checkpoint")
    return row


def collect(dirs: Iterable[str | Path]) -> tuple[pd.DataFrame, list[str], list[tuple[str, str]], list[str]]:
    """Read every record under `dirs`.

    Returns:
        (runs, swept parameter names, skipped (file, why), run folders without metrics.json).
    """
    dirs = [Path(d) for d in dirs]
    files, missing = find_run_files(dirs)
    rows, skipped = [], []
    for root, path in files:
        try:
            record = read_record(path)
        except ValueError as err:
            log.warning("skipping %s: %s", path, err)
            skipped.append((str(path), str(err)))
            continue
        name = os.path.relpath(path.parent, root)
        name = root.name if name == "." else name
        rows.append(record_row(record, name if len(dirs) == 1 else f"{root.name}/{name}"))
    for folder in missing:
        log.warning("no %s in %s (killed, or still running)", METRICS_FILE, folder)
    runs = pd.DataFrame(rows)
    if runs.empty:
        return runs, [], skipped, missing
    setting_cols = [c for c in runs.columns if c.startswith("override:")]
    # A setting is swept when its value differs between runs (absent counts as a value).
    swept = [c for c in setting_cols if runs[c].nunique(dropna=False) > 1]
    params = [c.removeprefix("override:") for c in swept]
    renames = {f"override:{p}": p for p in params if p not in runs.columns}
    runs = runs.drop(columns=[c for c in setting_cols if c not in renames]).rename(columns=renames)
    params = [p for p in params if f"override:{p}" in renames]
    for p in params:
        runs[p] = runs[p].map(lambda v: parse_value(v) if isinstance(v, str) else v).astype(object)
    return runs, params, skipped, missing


# --- tables -------------------------------------------------------------------------------------------------


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
        for metric in ("ppl", "acc", "shallow_ratio", "compute_cost"):
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


# --- formatting ---------------------------------------------------------------------------------------------


def _fmt_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def mean_std(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    """`22.95 ± 0.31`; the mean alone for a group of one, `—` when missing."""
    if mean is None or not math.isfinite(mean):
        return "—"
    if std is None or not math.isfinite(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def label(param: str) -> str:
    return LABELS.get(param, param)


def _varying_weights(groups: pd.DataFrame) -> list[str]:
    cols = sorted((c for c in groups.columns if c.startswith("weight_L")), key=lambda c: int(c[8:]))
    return [c for c in cols if groups[c].round(9).nunique(dropna=False) > 1]


def _baseline_ppl(groups: pd.DataFrame, baseline: str | None) -> float | None:
    if not baseline or groups.empty:
        return None
    key, value = parse_override(baseline)
    if key not in groups.columns:
        log.warning("baseline %s: %s is not a swept setting", baseline, key)
        return None
    match = groups[groups[key].map(lambda v: str(v) == str(parse_value(value)) or str(v) == value)]
    if match.empty:
        log.warning("baseline %s: no group has it", baseline)
        return None
    return float(match["ppl_mean"].iloc[0])


def _settings_columns(df: pd.DataFrame, params: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({label(p): df[p].map(_fmt_value) for p in params}, index=df.index)


def _metric_columns(table: pd.DataFrame, df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Append seed 003's metric columns (PPL, Shallow%, Compute%) as `mean ± std` strings, then n."""
    spec = {"PPL": ("ppl", 1.0, 2), "Shallow%": ("shallow_ratio", 100.0, 1), "Compute%": ("compute_cost", 100.0, 1)}
    for name in columns:
        metric, scale, digits = spec[name]
        table[name] = [mean_std(m, s, scale, digits) for m, s in zip(df[f"{metric}_mean"], df[f"{metric}_std"])]
    table["n"] = df["n"]
    return table


def main_table(groups: pd.DataFrame, params: Sequence[str], baseline: str | None = None) -> pd.DataFrame:
    """Seed 003's layout: the swept settings, the layer weights that vary, PPL | Shallow% | Compute% | n."""
    if groups.empty:
        return pd.DataFrame()
    table = _settings_columns(groups, params)
    for col in _varying_weights(groups):
        table[f"L{col[8:]} weight"] = groups[col].map(lambda w: "—" if pd.isna(w) else f"{100 * w:.0f}%")
    table = _metric_columns(table, groups, ["PPL", "Shallow%", "Compute%"])
    base = _baseline_ppl(groups, baseline)
    if base:  # seed 001's layer-LR table: improvement over the baseline group's PPL
        table.insert(table.columns.get_loc("PPL") + 1, "vs baseline", groups["ppl_mean"].map(
            lambda p: f"{100 * (base - p) / base:+.1f}%"
        ))  # fmt: skip
    return table


def threshold_display(thresholds: pd.DataFrame, params: Sequence[str]) -> pd.DataFrame:
    """Seed 003's threshold layout: [settings] | Threshold | PPL | Shallow% | Compute% | n."""
    if thresholds.empty:
        return pd.DataFrame()
    table = _settings_columns(thresholds, [p for p in params if p in thresholds.columns])
    table["Threshold"] = thresholds["threshold"].map(lambda t: f"{t:.2f}" if isinstance(t, float) else str(t))
    return _metric_columns(table, thresholds, ["PPL", "Shallow%", "Compute%"])


def pareto_display(front: pd.DataFrame, params: Sequence[str]) -> pd.DataFrame:
    """The Pareto groups, cheapest first: [settings] | PPL | Compute% | Shallow% | n."""
    if front.empty:
        return pd.DataFrame()
    return _metric_columns(_settings_columns(front, params), front, ["PPL", "Compute%", "Shallow%"])


def _md(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, disable_numparse=True) if not table.empty else "(none)"


def render_markdown(res: Results, sources: Sequence[Path], main: pd.DataFrame, baseline: str | None) -> str:
    runs = res.runs
    counts = runs["status"].value_counts().to_dict() if not runs.empty else {}
    lines = [
        "# Results",
        "",
        f"Sources: {', '.join(str(s) for s in sources)}",
        "",
        f"{len(runs)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) if counts else "0 runs",
        "",
        f"Swept: {', '.join(res.params) or '(nothing varies)'}. Groups: runs differing only in seed, "
        "mean ± std (sample std over seeds), n = runs in the group.",
        "",
        "## Main table",
        "",
        _md(main),
        "",
    ]
    if baseline:
        lines += [f"vs baseline: PPL improvement over the {baseline} group (positive = lower PPL).", ""]
    lines += [
        "## Threshold analysis (from each run's one-pass curve)",
        "",
        _md(threshold_display(res.thresholds, curve_params(runs, res.params))),
        "",
    ]
    lines += ["## Pareto front (PPL vs compute cost, group means)", "", _md(pareto_display(res.pareto, res.params)), ""]
    failed = runs[runs["status"] != "ok"] if not runs.empty else runs
    lines += ["## Failed runs", ""]
    if failed.empty:
        lines += ["(none)", ""]
    else:
        table = failed[["run", "status", "error"]].copy()
        table["error"] = table["error"].map(lambda e: str(e).splitlines()[0][:200] if e else "")
        lines += [_md(table), ""]
    if res.skipped:
        lines += ["## Unreadable records (skipped)", "", _md(pd.DataFrame(res.skipped, columns=["file", "why"])), ""]
    if res.missing:
        lines += ["## Runs without metrics.json (killed or still running)", ""]
        lines += [f"- {m}" for m in res.missing] + [""]
    return "\n".join(lines)


# --- plots --------------------------------------------------------------------------------------------------


def _group_label(row: pd.Series, params: Sequence[str]) -> str:
    return ", ".join(f"{label(p)}={_fmt_value(row[p])}" for p in params) or "all runs"


def plot_pareto(runs: pd.DataFrame, groups: pd.DataFrame, params: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
                ax.annotate(_group_label(row, params), (100 * row["compute_cost_mean"], row["ppl_mean"]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("compute cost (% of layers)")
    ax.set_ylabel("PPL")
    ax.set_title("PPL vs compute")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def plot_threshold_curves(thresholds: pd.DataFrame, params: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_cost) = plt.subplots(1, 2, figsize=(10, 4))
    scalar = thresholds[thresholds["threshold"].map(lambda t: isinstance(t, (int, float)))]
    keep = [p for p in params if p in scalar.columns]
    parts = scalar.groupby([scalar[p].astype(str) for p in keep], sort=False) if keep else [("", scalar)]
    for _, part in parts:
        part = part.sort_values("threshold")
        name = _group_label(part.iloc[0], keep)
        t = part["threshold"].astype(float)
        for ax, metric, scale in ((ax_ppl, "ppl", 1.0), (ax_cost, "compute_cost", 100.0)):
            mean, std = scale * part[f"{metric}_mean"], scale * part[f"{metric}_std"].fillna(0)
            (line,) = ax.plot(t, mean, marker="o", ms=3, label=name)
            ax.fill_between(t, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)  # ± std over seeds
    ax_ppl.set(xlabel="routing threshold", ylabel="PPL", title="PPL vs threshold")
    ax_cost.set(xlabel="routing threshold", ylabel="compute cost (%)", title="Compute vs threshold")
    ax_ppl.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Let `write` fill a temporary file beside `path`, then rename it: a reader never sees half a table."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- entry points -------------------------------------------------------------------------------------------


def write_results(
    dirs: Iterable[str | Path],
    out_dir: str | Path,
    echo: bool = False,
    baseline: str | None = None,
    plots: bool = True,
) -> Results:
    """Collect the records under `dirs`, write the tables (and plots) into `out_dir`, optionally print them.

    Args:
        dirs: Sweep or run folders, searched recursively for metrics.json.
        out_dir: Where results.csv, results_groups.csv, results.md and the PNGs go.
        echo: Print the main table, the failed runs and the skipped files.
        baseline: `KEY=VALUE` of the group a "vs baseline" column compares with (seed 001's layer-LR table).
        plots: Write the PNG plots.
    """
    sources = [Path(d) for d in dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, params, skipped, missing = collect(sources)
    groups = group_runs(runs, params) if not runs.empty else pd.DataFrame()
    res = Results(
        runs=runs,
        groups=groups,
        thresholds=threshold_table(runs, params) if not runs.empty else pd.DataFrame(),
        pareto=pareto_front(groups),
        params=params,
        skipped=skipped,
        missing=missing,
    )
    main = main_table(groups, params, baseline)
    res.markdown = render_markdown(res, sources, main, baseline)
    public = [c for c in runs.columns if not c.startswith("_")]
    res.files.append(out_dir / "results.csv")
    atomic_write(res.files[-1], lambda tmp: runs[public].to_csv(tmp, index=False))
    res.files.append(out_dir / "results_groups.csv")
    atomic_write(res.files[-1], lambda tmp: groups.to_csv(tmp, index=False))
    res.files.append(out_dir / "results.md")
    atomic_write(res.files[-1], lambda tmp: tmp.write_text(res.markdown, encoding="utf-8"))
    if plots and not finished(runs).empty:
        res.files.append(out_dir / "ppl_vs_compute.png")
        plot_pareto(runs, groups, params, res.files[-1])
        if not res.thresholds.empty:
            res.files.append(out_dir / "threshold_curves.png")
            plot_threshold_curves(res.thresholds, curve_params(runs, params), res.files[-1])
    if echo:
        print(_echo(res, main, out_dir))
    return res


def _echo(res: Results, main: pd.DataFrame, out_dir: Path) -> str:
    runs = res.runs
    lines = [f"results: {len(runs)} runs, {len(res.groups)} groups -> {out_dir}", _md(main)]
    failed = runs[runs["status"] != "ok"] if not runs.empty else runs
    if not failed.empty:
        lines.append(f"failed runs ({len(failed)}):")
        lines += [f"  {r.run}: {str(r.error or r.status).splitlines()[0][:160]}" for r in failed.itertuples()]
    lines += [f"skipped {f}: {why}" for f, why in res.skipped]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ease.results DIR [DIR...] [--out OUT] [--baseline KEY=VALUE] [--no-plots]`."""
    parser = argparse.ArgumentParser(prog="ease-results", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run folders (searched for metrics.json)")
    parser.add_argument("--out", type=Path, help="output folder (default: DIR when one is given, else ./results)")
    parser.add_argument("--baseline", help="KEY=VALUE of the group to compare PPL with, e.g. lr_scales=uniform")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    out = args.out or (args.dirs[0] if len(args.dirs) == 1 and args.dirs[0].is_dir() else Path("results"))
    res = write_results(args.dirs, out, echo=True, baseline=args.baseline, plots=not args.no_plots)
    if res.runs.empty:
        print("no readable metrics.json found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
