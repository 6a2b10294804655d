"""Is a group's difference from the baseline group more than seed noise? Welch t-test, bootstrap CI, Holm.

For each group against one baseline group and each compared metric (PPL, compute cost where recorded):
  diff        mean(group) - mean(baseline): positive PPL = worse, positive compute = more layers run
  ci_low/high the bootstrap 95% percentile interval of that difference (each group resampled on its own, a fixed
              seed per comparison, so the same records always give the same interval)
  p           Welch's t-test (unequal variances): seeds of two settings need not spread alike
  p_holm      Holm's step-down correction over the comparisons of that metric (k groups: k - 1 comparisons)
  significant p_holm < 0.05 with at least 3 runs in both groups; never claimed below 3 runs
scipy is imported only when a comparison is computed (it is slow to import).
"""

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ease.results.collect import parse_override, parse_value

log = logging.getLogger("ease.results")

ALPHA = 0.05  # significance level, after Holm's correction
MIN_RUNS = 3  # fewer runs in a group: p and CI are printed, significance is not claimed
CONFIDENCE = 0.95
N_RESAMPLES = 9999
SEED = 0
# Compared metrics: run column -> (table name, display scale, digits, unit in words); compute in percentage points.
METRICS: dict[str, tuple[str, float, int, str]] = {
    "ppl": ("PPL", 1.0, 2, "PPL"),
    "compute_cost": ("Compute%", 100.0, 1, "pts compute"),
}
# results_groups.csv columns added per metric, e.g. ppl_diff, ppl_ci_low, ..., ppl_significant.
FIELDS = ("n", "n_base", "diff", "ci_low", "ci_high", "p", "p_holm", "significant")


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values, in the input order; NaN entries stay NaN and do not count in the family.

    Sorted ascending, the i-th smallest of m is scaled by (m - i), then made non-decreasing and capped at 1:
    `adjusted <= alpha` rejects exactly the hypotheses Holm's step-down procedure rejects at level alpha.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m = len(order)
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test; NaN when a group has < 2 values or both have no spread at all."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    from scipy import stats

    with warnings.catch_warnings():  # equal or near-equal values: scipy warns and returns NaN, reported as such
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def bootstrap_ci(
    a: Sequence[float], b: Sequence[float], seed: int = SEED, n_resamples: int = N_RESAMPLES
) -> tuple[float, float]:
    """Bootstrap percentile interval (95%) of mean(a) - mean(b), each sample resampled on its own; NaN for n < 2.

    Percentile rather than BCa: BCa's jackknife is undefined for the constant samples a deterministic
    compute cost gives, and with 3 seeds neither is more than a rough guide.
    """
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    from scipy import stats

    with warnings.catch_warnings():  # constant samples: a degenerate (zero-width) interval, which is right
        warnings.simplefilter("ignore")
        ci = stats.bootstrap(
            (np.asarray(a, dtype=float), np.asarray(b, dtype=float)), _mean_diff, n_resamples=n_resamples,
            vectorized=True, paired=False, confidence_level=CONFIDENCE, method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval  # fmt: skip
    return float(ci.low), float(ci.high)


def find_baseline(groups: pd.DataFrame, params: Sequence[str], name: str | None) -> int:
    """Row index of the baseline group: `name` is a `group` string or KEY=VALUE pairs; default the first group.

    A name no group matches falls back to the first group with a warning (a sweep narrowed on the command line
    may have dropped its configured baseline: its tables are still written).
    """
    if not name:
        return 0
    exact = groups.index[groups["group"] == name]
    if len(exact):
        return int(exact[0])
    pairs = [parse_override(part) for part in name.replace(",", " ").split()]
    unknown = [key for key, _ in pairs if key not in params]
    if not pairs or unknown:
        log.warning("baseline %r: not KEY=VALUE of a swept setting; comparing with the first group", name)
        return 0
    match = np.ones(len(groups), dtype=bool)
    for key, value in pairs:
        match &= groups[key].map(lambda v, value=value: str(v) in (str(parse_value(value)), value)).to_numpy()
    if not match.any():
        log.warning("baseline %s: no group has it; comparing with the first group", name)
        return 0
    return int(groups.index[np.flatnonzero(match)[0]])


def _values(runs: pd.DataFrame, group: Any, metric: str) -> np.ndarray:
    values = runs.loc[runs["group"] == group, metric].astype(float).to_numpy()
    return values[np.isfinite(values)]


def compare_groups(runs: pd.DataFrame, groups: pd.DataFrame, baseline: int) -> pd.DataFrame:
    """Per group and metric: n, diff, ci_low, ci_high, p, p_holm, significant against the baseline row.

    `runs` are the finished runs and `groups` their seed groups (group_runs). Columns are `<metric>_<field>`
    plus `baseline` (True on the baseline's row, whose comparison fields are NaN); a metric no run recorded is
    left out. Rows align with `groups`.
    """
    out = pd.DataFrame({"baseline": groups.index == baseline}, index=groups.index)
    base_group = groups.loc[baseline, "group"]
    for metric in METRICS:
        if metric not in runs or not np.isfinite(runs[metric].astype(float)).any():
            continue
        base = _values(runs, base_group, metric)
        rows = {}
        for i, group in groups["group"].items():
            values = _values(runs, group, metric)
            rows[i] = {"n": len(values), "n_base": len(base)}
            if i == baseline:
                continue
            low, high = bootstrap_ci(values, base)
            diff = values.mean() - base.mean() if len(values) and len(base) else math.nan
            rows[i] |= {"diff": diff, "ci_low": low, "ci_high": high, "p": welch_p(values, base)}
        table = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=FIELDS[:-2])
        table["p_holm"] = holm(table["p"].to_numpy())
        small = (table["n"] < MIN_RUNS) | (table["n_base"] < MIN_RUNS)
        table["significant"] = ((table["p_holm"] < ALPHA) & ~small).astype(object)
        table.loc[baseline, "significant"] = None  # the baseline is not compared with itself
        out = out.join(table.add_prefix(f"{metric}_"))
    return out
