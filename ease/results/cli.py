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
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ease.io import atomic_write
from ease.results.collect import collect
from ease.results.group import curve_params, finished, group_runs, pareto_front, threshold_table
from ease.results.plots import plot_pareto, plot_threshold_curves
from ease.results.tables import main_table, markdown_table, render_markdown


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
    lines = [f"results: {len(runs)} runs, {len(res.groups)} groups -> {out_dir}", markdown_table(main)]
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
