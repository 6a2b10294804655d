"""Comparison tables and plots from run records: `python -m ease.results DIR [DIR...]` (or `ease-results`).

Every metrics.json under the folders becomes one row of a pandas DataFrame (overrides, swept parameters,
metrics, status, seed). Runs whose overrides differ only in the seed form a group, reported as mean ± std over
its n seeds. Written into the output folder:
  results.csv          one row per run, failed runs included (status, error)
  results_groups.csv   one row per group: n, <metric>_mean / <metric>_std, and against the baseline group
                       (--baseline, default the first): <metric>_diff, _ci_low, _ci_high (bootstrap 95%), _p (Welch),
                       _p_holm, _significant for PPL and compute cost (significance.py)
  results.md           seed 003's layouts: α | L1 weight | L3 weight | PPL | Shallow% | Compute%, the threshold
                       table (from each run's recorded curve), the Pareto front of PPL vs compute, failed runs,
                       and the files that could not be read; the significance table and, in words, which
                       differences from the baseline are significant (Holm, 0.05) and which are not
  results_grid.csv     runs with a compute grid (compare=grid): per group and compute level, test PPL, achieved compute,
                       tokens/s and speedup (mean/std over seeds), p vs the baseline (Holm); results.md's "Methods
                       at equal compute" section shows it
  methods_pareto.png   test PPL vs achieved compute per method over its grid levels, the front marked
  ppl_vs_compute.png   every run and group mean, the Pareto front marked
  threshold_curves.png PPL and compute against the routing threshold, one line per group
Corrupt or half-written metrics.json files are reported (log warning and results.md) and skipped; an ok record
without a finite PPL is listed with the failed runs (status nan). A bad path is one line on stderr, exit 1.
"""

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ease.io import atomic_write
from ease.results.collect import METRICS_FILE, collect
from ease.results.group import (
    curve_params,
    failed,
    finished,
    grid_table,
    group_runs,
    pareto_front,
    pruned,
    threshold_table,
)
from ease.results.plots import plot_methods_pareto, plot_pareto, plot_threshold_curves
from ease.results.significance import compare_groups, find_baseline
from ease.results.tables import grid_display, main_table, markdown_table, render_markdown, significance_sentences


@dataclass
class Results:
    """What `write_results` found and wrote."""

    runs: pd.DataFrame  # one row per readable run record
    groups: pd.DataFrame  # one row per group of finished runs (mean/std over seeds, tests against the baseline)
    thresholds: pd.DataFrame  # the threshold table, one row per (group, threshold)
    pareto: pd.DataFrame  # the groups on the PPL / compute Pareto front
    params: list[str]  # the swept settings (override keys whose value varies between runs)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) for unreadable records
    missing: list[str] = field(default_factory=list)  # run folders without a metrics.json
    markdown: str = ""
    files: list[Path] = field(default_factory=list)
    # methods at equal compute: one row per (group, compute level), from runs that recorded a compute grid
    grid: pd.DataFrame = field(default_factory=pd.DataFrame)


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
        baseline: The group the significance tests compare with, as its `group` string or `KEY=VALUE` pairs
            (default, or when no group matches: the first group); given, it also adds seed 001's "vs baseline"
            column to the main table.
        plots: Write the PNG plots.
    """
    sources = [Path(d) for d in dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, params, skipped, missing = collect(sources)
    groups = group_runs(runs, params) if not runs.empty else pd.DataFrame()
    if not groups.empty:  # each group against the baseline: Δ, bootstrap CI, Welch p, Holm (significance.py)
        groups = groups.join(compare_groups(finished(runs), groups, find_baseline(groups, params, baseline)))
    res = Results(
        runs=runs,
        groups=groups,
        thresholds=threshold_table(runs, params) if not runs.empty else pd.DataFrame(),
        pareto=pareto_front(groups),
        params=params,
        skipped=skipped,
        missing=missing,
    )
    if not groups.empty:
        base = groups.loc[groups["baseline"].astype(bool), "group"]
        res.grid = grid_table(runs, params, base.iloc[0] if len(base) else None)
    main = main_table(groups, params, baseline)
    res.markdown = render_markdown(res, sources, main, baseline)
    public = [c for c in runs.columns if not c.startswith("_")]
    res.files.append(out_dir / "results.csv")
    atomic_write(res.files[-1], lambda tmp: runs[public].to_csv(tmp, index=False))
    res.files.append(out_dir / "results_groups.csv")
    atomic_write(res.files[-1], lambda tmp: groups.to_csv(tmp, index=False))
    res.files.append(out_dir / "results.md")
    atomic_write(res.files[-1], lambda tmp: tmp.write_text(res.markdown, encoding="utf-8"))
    if not res.grid.empty:
        res.files.append(out_dir / "results_grid.csv")
        atomic_write(res.files[-1], lambda tmp: res.grid.to_csv(tmp, index=False))
    if plots and not res.grid.empty and (res.grid["n"] > 0).any():
        res.files.append(out_dir / "methods_pareto.png")
        plot_methods_pareto(res.grid, params, res.files[-1])
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
    lines = [f"results: {len(runs)} runs, {len(res.groups)} groups -> {out_dir}", markdown_table(main)]
    if not res.grid.empty:
        lines += [
            "methods at equal compute (test PPL at each compute level):",
            markdown_table(grid_display(res.grid, res.params)),
        ]
    lines += significance_sentences(res.groups, res.params)
    stopped, bad = pruned(runs), failed(runs)
    if not stopped.empty:
        lines.append(f"pruned runs ({len(stopped)}): " + ", ".join(str(r) for r in stopped["run"]))
    if not bad.empty:
        lines.append(f"failed runs ({len(bad)}):")
        lines += [f"  {r.run}: {str(r.error or r.status).splitlines()[0][:160]}" for r in bad.itertuples()]
    lines += [f"skipped {f}: {why}" for f, why in res.skipped]
    return "\n".join(lines)


def _input_error(path: Path) -> str | None:
    """Why `path` cannot be read as runs, or None: it must be a folder or a metrics.json."""
    if path.is_dir() or (path.is_file() and path.name == METRICS_FILE):
        return None
    if path.exists():
        return f"{path} is a file, not a folder of runs (give the folder that holds the runs, or a {METRICS_FILE})"
    return f"no such folder: {path}"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ease.results DIR [DIR...] [--out OUT] [--baseline NAME] [--no-plots]`.

    Returns 0, or 1 after one line on stderr: a path that is not a folder of runs, an --out that is a file,
    no readable record, or an OS error while writing.
    """
    parser = argparse.ArgumentParser(prog="ease-results", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run folders (searched for metrics.json)")
    parser.add_argument("--out", type=Path, help="output folder (default: DIR when one is given, else ./results)")
    parser.add_argument(
        "--baseline", metavar="NAME",
        help="the group the others are tested against: KEY=VALUE [KEY=VALUE...] or its `group` string from "
        "results_groups.csv, e.g. lr_scales=uniform (default: the first group); also adds a 'vs baseline' column",
    )  # fmt: skip
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    out = args.out or (args.dirs[0] if len(args.dirs) == 1 and args.dirs[0].is_dir() else Path("results"))
    errors = [e for e in map(_input_error, args.dirs) if e]
    if not errors and out.exists() and not out.is_dir():
        errors.append(f"--out {out} is a file; give a folder for the results")
    if errors:
        print(f"ease-results: error: {errors[0]}", file=sys.stderr)
        return 1
    try:
        res = write_results(args.dirs, out, echo=True, baseline=args.baseline, plots=not args.no_plots)
    except OSError as err:  # e.g. an --out folder that cannot be written: one line, not a traceback
        print(f"ease-results: error: {err.strerror or err}: {err.filename or out}", file=sys.stderr)
        return 1
    if res.runs.empty:
        print("ease-results: error: no readable metrics.json found", file=sys.stderr)
        return 1
    return 0
