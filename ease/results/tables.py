"""Display tables in seed 003's layouts (mean ± std strings), the significance table and sentences, results.md."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ease.results.group import curve_params, failed, pruned
from ease.results.significance import ALPHA, CONFIDENCE, METRICS, MIN_RUNS, N_RESAMPLES

if TYPE_CHECKING:  # cli imports this module: only the type, to avoid a cycle
    from ease.results.cli import Results

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
    "preset": "Method",
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


def group_label(row: pd.Series, params: Sequence[str]) -> str:
    """A group in words: `α=0.3, LR scales=uniform`; `all runs` when nothing is swept."""
    return ", ".join(f"{label(p)}={fmt_value(row[p])}" for p in params) or "all runs"


def fmt_p(p: float) -> str:
    """A p-value for a table: 3 significant digits, `<0.001` below, `—` when there is none."""
    if p is None or not math.isfinite(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3g}"


def _varying_weights(groups: pd.DataFrame) -> list[str]:
    cols = sorted((c for c in groups.columns if c.startswith("weight_L")), key=lambda c: int(c[8:]))
    return [c for c in cols if groups[c].round(9).nunique(dropna=False) > 1]


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
    if "feasible_mean" in groups and groups["feasible_mean"].notna().any():  # a sweep with constraints
        table.insert(table.columns.get_loc("PPL"), "Feasible", groups["feasible_mean"].map(_feasible))
    base = float(groups.loc[groups["baseline"], "ppl_mean"].iloc[0]) if baseline and "baseline" in groups else None
    if base and math.isfinite(base):  # seed 001's layer-LR table: improvement over the baseline group's PPL
        table.insert(table.columns.get_loc("PPL") + 1, "vs baseline", groups["ppl_mean"].map(
            lambda p: f"{100 * (base - p) / base:+.1f}%"
        ))  # fmt: skip
    return table


def _feasible(share: float) -> str:
    """A group's share of runs that satisfied the sweep's constraints: yes, NO, or the share."""
    if pd.isna(share):
        return ""
    return "yes" if share == 1 else "NO" if share == 0 else f"{100 * share:.0f}%"


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


def _compared(groups: pd.DataFrame) -> list[str]:
    """The metrics compare_groups filled in for `groups` (compute cost only where runs recorded it)."""
    return [m for m in METRICS if f"{m}_p" in groups.columns]


def significance_display(groups: pd.DataFrame, params: Sequence[str]) -> pd.DataFrame:
    """Each group against the baseline: [settings] | n | per metric: Δ | 95% CI | p | p (Holm) | Significant."""
    if groups.empty or "baseline" not in groups or len(groups) < 2:
        return pd.DataFrame()
    rows = groups[~groups["baseline"].astype(bool)]
    table = _settings_columns(rows, params)
    table["n"] = rows["n"]
    for metric in _compared(groups):
        name, scale, digits, _ = METRICS[metric]
        table[f"Δ{name}"] = rows[f"{metric}_diff"].map(lambda d, s=scale, k=digits: _signed(d, s, k))
        table[f"Δ{name} 95% CI"] = [
            _interval(lo, hi, scale, digits) for lo, hi in zip(rows[f"{metric}_ci_low"], rows[f"{metric}_ci_high"])
        ]
        table[f"{name} p"] = rows[f"{metric}_p"].map(fmt_p)
        table[f"{name} p (Holm)"] = rows[f"{metric}_p_holm"].map(fmt_p)
        table[f"{name} significant"] = [_verdict(r, metric, short=True) for _, r in rows.iterrows()]
    return table


def _signed(value: float, scale: float, digits: int) -> str:
    return "—" if not math.isfinite(value) else f"{value * scale:+.{digits}f}"


def _interval(low: float, high: float, scale: float, digits: int) -> str:
    return "—" if not math.isfinite(low) else f"[{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def _verdict(row: pd.Series, metric: str, short: bool = False) -> str:
    """significant / not significant at ALPHA after Holm, or why none is claimed (too few runs, no spread)."""
    n, n_base, p = row[f"{metric}_n"], row[f"{metric}_n_base"], row[f"{metric}_p"]
    if min(n, n_base) < 2:
        why = f"a t-test needs at least 2 runs per group (n={n}, baseline n={n_base})"
        return "no test (n < 2)" if short else f"no test: {why}"
    if not math.isfinite(p):
        return "no test (no spread)" if short else "no test: every run in both groups gave the same value"
    if min(n, n_base) < MIN_RUNS:
        return f"not claimed (n < {MIN_RUNS})"
    return "significant" if row[f"{metric}_significant"] else "not significant"


def significance_lines(groups: pd.DataFrame, params: Sequence[str]) -> list[str]:
    """results.md's significance section: what is computed, the table, one sentence per comparison, warnings."""
    lines = ["## Significance vs baseline", ""]
    if groups.empty or "baseline" not in groups:
        return [*lines, "(no groups)", ""]
    base = groups[groups["baseline"].astype(bool)].iloc[0]
    base_name = group_label(base, params)
    if len(groups) < 2:
        return [*lines, f"One group ({base_name}): nothing to compare.", ""]
    lines += [
        f"Baseline: {base_name} (n={base['n']}; `--baseline NAME` picks another, default the first group). "
        "Δ = group mean − baseline mean over seeds (PPL; compute in percentage points of the layers run): "
        f"negative is better. {100 * CONFIDENCE:.0f}% CI: bootstrap percentile interval of Δ ({N_RESAMPLES} "
        f"resamples, fixed seed). p: Welch's t-test; p (Holm): Holm's correction over the {len(groups) - 1} "
        f"comparison{'s' if len(groups) > 2 else ''} of a metric (the verdict follows it: with few seeds the "
        f"bootstrap interval is narrower than the t-test's). Significant: p (Holm) < {ALPHA} with at least "
        f"{MIN_RUNS} runs in both groups.",
        "",
        markdown_table(significance_display(groups, params)),
        "",
    ]
    return [*lines, *significance_sentences(groups, params), ""]


def significance_sentences(groups: pd.DataFrame, params: Sequence[str]) -> list[str]:
    """The warning for groups under MIN_RUNS runs, then one line per group: its differences from the baseline."""
    if groups.empty or "baseline" not in groups or len(groups) < 2:
        return []
    lines = []
    small = groups[groups["n"] < MIN_RUNS]
    if not small.empty:
        names = ", ".join(f"{group_label(r, params)} (n={r['n']})" for _, r in small.iterrows())
        lines.append(
            f"**Warning**: fewer than {MIN_RUNS} runs in {names}: no difference involving "
            f"{'it' if len(small) == 1 else 'them'} is called significant; run more seeds."
        )
        lines.append("")
    base_name = group_label(groups[groups["baseline"].astype(bool)].iloc[0], params)
    for _, row in groups[~groups["baseline"].astype(bool)].iterrows():
        parts = [_sentence(row, metric) for metric in _compared(groups)] or ["no PPL or compute cost recorded"]
        lines.append(f"- {group_label(row, params)} vs {base_name} (baseline): {'; '.join(parts)}")
    return lines


def _sentence(row: pd.Series, metric: str) -> str:
    """`+0.29 PPL, 95% CI [-0.80, 1.30], p=0.61 (Holm): not significant`, or why there is no test."""
    _, scale, digits, unit = METRICS[metric]
    diff = row[f"{metric}_diff"]
    if not math.isfinite(diff):
        return f"no {unit} recorded"
    text = f"{_signed(diff, scale, digits)} {unit}"
    low, high = row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
    if math.isfinite(low):
        text += f", {100 * CONFIDENCE:.0f}% CI {_interval(low, high, scale, digits)}"
    if math.isfinite(row[f"{metric}_p"]):
        p = fmt_p(row[f"{metric}_p_holm"])
        text += f", p{p if p.startswith('<') else '=' + p} (Holm)"
    return f"{text}: {_verdict(row, metric)}"


def _level(target: float) -> str:
    return f"{100 * target:.0f}%"


def _grid_cell(row: pd.Series) -> str:
    """`22.95 ± 0.31 (3)`: test PPL over the seeds that reached the level; `unreachable`, or `fixed` marked."""
    if row["n"] == 0:
        return "unreachable"
    text = f"{mean_std(row['test_ppl_mean'], row['test_ppl_std'])} ({row['n']})"
    if row["fixed"]:
        text += f" fixed @ {100 * row['test_compute_cost_mean']:.0f}%"
    if row["n_unreachable"]:
        text += f", {row['n_unreachable']} unreachable"
    return text


def grid_display(grid: pd.DataFrame, params: Sequence[str]) -> pd.DataFrame:
    """Methods at equal compute, one row per group: [settings] | one column per compute level: test PPL ± std (n)."""
    if grid.empty:
        return pd.DataFrame()
    keep = [p for p in params if p in grid.columns]
    out = []
    for _, part in grid.groupby("group", sort=False):
        row = {label(p): fmt_value(part[p].iloc[0]) for p in keep}
        row.update({_level(t): _grid_cell(r) for t, (_, r) in zip(part["target"], part.iterrows())})
        out.append(row)
    return pd.DataFrame(out).fillna("—")


def grid_details(grid: pd.DataFrame, params: Sequence[str]) -> pd.DataFrame:
    """Per group and level: target | test PPL | achieved test compute% | decoded compute% | tokens/s | speedup
    (over full depth, same decoder) | p vs baseline (Holm) | n."""
    if grid.empty:
        return pd.DataFrame()
    reached = grid[grid["n"] > 0]
    table = _settings_columns(reached, [p for p in params if p in reached.columns])
    table["Target"] = reached["target"].map(_level) + reached["fixed"].map(lambda f: " (fixed)" if f else "")
    columns = {
        "Test PPL": ("test_ppl", 1.0, 2),
        "Test compute%": ("test_compute_cost", 100.0, 1),
        "Decode compute%": ("decode_compute_cost", 100.0, 1),
        "Tokens/s": ("tokens_per_s", 1.0, 0),
        "Speedup": ("speedup", 1.0, 2),
    }
    for name, (metric, scale, digits) in columns.items():
        table[name] = [
            mean_std(m, s, scale, digits) for m, s in zip(reached[f"{metric}_mean"], reached[f"{metric}_std"])
        ]
    table["PPL p (Holm)"] = ["baseline" if b else fmt_p(p) for b, p in zip(reached["baseline"], reached["ppl_p_holm"])]
    table["n"] = reached["n"]
    return table


def grid_lines(grid: pd.DataFrame, params: Sequence[str]) -> list[str]:
    """results.md's "Methods at equal compute" section (only when runs recorded a compute grid)."""
    if grid.empty:
        return []
    base = grid[grid["baseline"]]
    base_text = (
        f"p (Holm): Welch's t-test of test PPL against {group_label(base.iloc[0], params)} at the same level, "
        "Holm over the methods compared at that level."
        if not base.empty
        else "No baseline group (`--baseline`): no tests."
    )
    return [
        "## Methods at equal compute (test split)",
        "",
        "Each run's threshold is calibrated on the validation split to each compute cost (layers computed / total "
        "layers) and the TEST split is scored there: test PPL mean ± std over seeds (n = seeds that reached the "
        "level). unreachable: no threshold gives that cost on the validation data; fixed: the method's cost is "
        "not set by a threshold, shown at the level nearest its own cost.",
        "",
        markdown_table(grid_display(grid, params)),
        "",
        "Achieved compute and measured decoding speed at each level: Test compute% is the cost the calibrated "
        "threshold gives on the test split (counted); Decode compute% and Tokens/s come from a short greedy "
        "generation with the early-exit decoder at that threshold, Speedup over the same decoder at full depth, "
        f"timed in turns (mean ± std over seeds). {base_text}",
        "",
        markdown_table(grid_details(grid, params)),
        "",
    ]


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
    if baseline and "vs baseline" in main:
        base = res.groups[res.groups["baseline"].astype(bool)].iloc[0]
        lines += [
            f"vs baseline: PPL improvement over the {group_label(base, res.params)} group (positive = lower PPL).",
            "",
        ]
    lines += grid_lines(res.grid, res.params)
    lines += significance_lines(res.groups, res.params)
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
    stopped = pruned(runs)
    if not stopped.empty:  # stopped by the sweep's pruner: not failures, and not in the means above
        table = stopped[["run", "error"]].rename(columns={"error": "stopped"})
        lines += [
            "## Pruned runs (stopped by the sweep's pruner; not in the tables above)",
            "",
            markdown_table(table),
            "",
        ]
    bad = failed(runs)
    lines += ["## Failed runs", ""]
    if bad.empty:
        lines += ["(none)", ""]
    else:
        table = bad[["run", "status", "error"]].copy()
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
