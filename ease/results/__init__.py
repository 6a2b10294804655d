"""Comparison tables and plots from run records: `python -m ease.results DIR [DIR...]` (or `ease-results`).

collect (metrics.json -> runs DataFrame) -> group (seed groups, threshold table, Pareto front, methods at equal
compute) -> significance (each group against a baseline: Welch p, bootstrap CI, Holm) -> tables (markdown / CSV
layouts) and plots (PNGs); cli writes them all (`write_results`) and is the command (`main`).
"""

from ease.results.cli import Results, main, write_results
from ease.results.collect import collect, find_run_files, parse_override, parse_value, read_record, record_row
from ease.results.group import (
    curve_params,
    finished,
    grid_points,
    grid_table,
    group_runs,
    pareto_front,
    pareto_mask,
    threshold_table,
)
from ease.results.plots import plot_methods_pareto, plot_pareto, plot_threshold_curves
from ease.results.significance import bootstrap_ci, compare_groups, find_baseline, holm, welch_p
from ease.results.tables import (
    grid_details,
    grid_display,
    main_table,
    mean_std,
    pareto_display,
    render_markdown,
    significance_display,
    significance_sentences,
    threshold_display,
)

__all__ = [
    "Results",
    "bootstrap_ci",
    "collect",
    "compare_groups",
    "curve_params",
    "find_baseline",
    "find_run_files",
    "finished",
    "grid_details",
    "grid_display",
    "grid_points",
    "grid_table",
    "group_runs",
    "holm",
    "main",
    "main_table",
    "mean_std",
    "pareto_display",
    "pareto_front",
    "pareto_mask",
    "parse_override",
    "parse_value",
    "plot_methods_pareto",
    "plot_pareto",
    "plot_threshold_curves",
    "read_record",
    "record_row",
    "render_markdown",
    "significance_display",
    "significance_sentences",
    "threshold_display",
    "threshold_table",
    "welch_p",
    "write_results",
]
