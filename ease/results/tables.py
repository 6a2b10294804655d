"""Display tables in seed 003's layouts (mean ± std strings) and their markdown rendering for results.md."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ease.results.collect import parse_override, parse_value
from ease.results.group import curve_params

if TYPE_CHECKING:  # cli imports this module: only the type, to avoid a cycle
    from ease.results.cli import Results

log = logging.getLogger("ease.results")

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


def fmt_value(value: Any) -> str:
    """A setting's value for a table: `—` when missing, floats to 4 significant digits."""
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
    """A setting's column header: its short name from LABELS, else the override key."""
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
    return pd.DataFrame({label(p): df[p].map(fmt_value) for p in params}, index=df.index)


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


def markdown_table(table: pd.DataFrame) -> str:
    """`table` as a markdown table, `(none)` when empty; cells are printed as they are (no number parsing)."""
    return table.to_markdown(index=False, disable_numparse=True) if not table.empty else "(none)"


def render_markdown(res: Results, sources: Sequence[Path], main: pd.DataFrame, baseline: str | None) -> str:
    """results.md: run counts, the main table, the threshold table, the Pareto front, failed and unreadable runs."""
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
        markdown_table(main),
        "",
    ]
    if baseline:
        lines += [f"vs baseline: PPL improvement over the {baseline} group (positive = lower PPL).", ""]
    lines += [
        "## Threshold analysis (from each run's one-pass curve)",
        "",
        markdown_table(threshold_display(res.thresholds, curve_params(runs, res.params))),
        "",
    ]
    lines += [
        "## Pareto front (PPL vs compute cost, group means)",
        "",
        markdown_table(pareto_display(res.pareto, res.params)),
        "",
    ]
    failed = runs[runs["status"] != "ok"] if not runs.empty else runs
    lines += ["## Failed runs", ""]
    if failed.empty:
        lines += ["(none)", ""]
    else:
        table = failed[["run", "status", "error"]].copy()
        table["error"] = table["error"].map(lambda e: str(e).splitlines()[0][:200] if e else "")
        lines += [markdown_table(table), ""]
    if res.skipped:
        lines += [
            "## Unreadable records (skipped)",
            "",
            markdown_table(pd.DataFrame(res.skipped, columns=["file", "why"])),
            "",
        ]
    if res.missing:
        lines += ["## Runs without metrics.json (killed or still running)", ""]
        lines += [f"- {m}" for m in res.missing] + [""]
    return "\n".join(lines)
