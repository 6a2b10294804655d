"""ease.results significance: Welch p, bootstrap CI and Holm against scipy / plain re-implementations; the words
results.md says; the n < 3 warning; bad records and paths give one line, never a traceback."""

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_results import md_table, record, write

from ease.results.cli import main, write_results
from ease.results.significance import SEED, bootstrap_ci, find_baseline, holm, welch_p


def holm_decisions(pvalues: list[float], alpha: float) -> list[bool]:
    """Holm's step-down procedure as written in the textbook: reject while p_(i) <= alpha / (m - i)."""
    m = len(pvalues)
    reject = [False] * m
    for i, j in enumerate(sorted(range(m), key=lambda k: pvalues[k])):
        if pvalues[j] > alpha / (m - i):
            break
        reject[j] = True
    return reject


def welch_by_hand(a: list[float], b: list[float]) -> float:
    """Welch's t and Welch-Satterthwaite degrees of freedom from the formulas, two-sided p from Student's t."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(2 * stats.t.sf(abs(t), df))


def test_holm_matches_known_values_and_the_step_down_procedure() -> None:
    # m = 4: 0.005*4, 0.01*3, 0.03*2 and max(0.06, 0.04*1) (the values statsmodels' multipletests gives).
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.2, math.nan, 0.01])  # NaN: no test, not counted in the family (m = 2)
    assert math.isnan(adjusted[1]) and list(adjusted[[0, 2]]) == pytest.approx([0.2, 0.02])
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    rng = np.random.default_rng(3)
    for _ in range(50):
        p = list(rng.uniform(0, 0.1, size=rng.integers(1, 8)))
        for alpha in (0.01, 0.05, 0.1):
            assert list(holm(p) <= alpha) == holm_decisions(p, alpha), (p, alpha)


def test_welch_p_and_bootstrap_ci_match_scipy_and_a_plain_resampling() -> None:
    rng = np.random.default_rng(0)
    a, b = list(rng.normal(24.0, 0.8, size=5)), list(rng.normal(23.0, 0.3, size=4))
    assert welch_p(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    assert welch_p(a, b) == pytest.approx(welch_by_hand(a, b), rel=1e-9)
    low, high = bootstrap_ci(a, b)
    direct = stats.bootstrap(
        (a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), vectorized=True, paired=False,
        n_resamples=9999, method="percentile", rng=np.random.default_rng(SEED),
    ).confidence_interval  # fmt: skip
    assert (low, high) == pytest.approx((direct.low, direct.high), rel=1e-12)
    assert bootstrap_ci(a, b) == (low, high)  # fixed seed: the same interval every time
    # A plain resampling loop (other random numbers) lands on the same interval up to Monte Carlo error.
    plain = np.random.default_rng(1)
    diffs = [plain.choice(a, len(a)).mean() - plain.choice(b, len(b)).mean() for _ in range(20000)]
    assert (low, high) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])), abs=0.05)
    assert low < np.mean(a) - np.mean(b) < high
    # Under 2 values a t-test and a bootstrap are undefined: NaN, never an exception.
    assert math.isnan(welch_p([1.0], b)) and all(math.isnan(x) for x in bootstrap_ci(a, [2.0]))


# Per α, PPL over seeds: α=0.5 is within noise of α=0.3, α=0.7 is far below it.
SWEEP = {0.3: [25.0, 25.2, 24.9, 25.1], 0.5: [25.3, 24.8, 25.4, 24.9], 0.7: [20.1, 20.0, 20.2, 19.9]}


def write_sweep(root: Path, ppls: dict[float, list[float]]) -> None:
    for alpha, values in ppls.items():
        for seed, ppl in enumerate(values):
            write(root / f"a{alpha}_s{seed}", record(alpha, seed, ppl))


def sentence(md: str, alpha: float) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"- α={alpha} vs "))


def test_significance_columns_and_words_match_scipy_and_holm(tmp_path: Path) -> None:
    write_sweep(tmp_path, SWEEP)
    res = write_results([tmp_path], tmp_path, plots=False)
    groups = res.groups.set_index("loss_weights.alpha")
    assert list(groups["baseline"]) == [True, False, False]  # default: the first group
    base = SWEEP[0.3]
    p = {a: stats.ttest_ind(SWEEP[a], base, equal_var=False).pvalue for a in (0.5, 0.7)}
    holm_p = dict(zip(p, holm(list(p.values()))))
    assert p[0.7] < 1e-4 < 0.3 < p[0.5]  # the data is what the test says it is
    md = (tmp_path / "results.md").read_text()
    rows = {r["α"]: r for r in md_table(md.split("## Significance vs baseline")[1], "α")}
    for alpha in (0.5, 0.7):
        diff = np.mean(SWEEP[alpha]) - np.mean(base)
        low, high = bootstrap_ci(SWEEP[alpha], base)
        assert groups.loc[alpha, "ppl_p"] == pytest.approx(p[alpha], rel=1e-12)
        assert groups.loc[alpha, "ppl_p_holm"] == pytest.approx(
            min(1.0, 2 * min(p.values())) if alpha == 0.7 else p[0.5]
        )
        assert groups.loc[alpha, "ppl_p_holm"] == pytest.approx(holm_p[alpha])
        assert (groups.loc[alpha, "ppl_ci_low"], groups.loc[alpha, "ppl_ci_high"]) == pytest.approx((low, high))
        assert (
            rows[str(alpha)]["ΔPPL"] == f"{diff:+.2f}" and rows[str(alpha)]["ΔPPL 95% CI"] == f"[{low:.2f}, {high:.2f}]"
        )
        verdict = "significant" if alpha == 0.7 else "not significant"
        p_text = "<0.001" if holm_p[alpha] < 0.001 else f"={holm_p[alpha]:.3g}"
        words = f"{diff:+.2f} PPL, 95% CI [{low:.2f}, {high:.2f}], p{p_text} (Holm): {verdict};"
        assert sentence(md, alpha).startswith(f"- α={alpha} vs α=0.3 (baseline): {words}")
        assert rows[str(alpha)]["PPL significant"] == verdict
    assert "pts compute" in sentence(md, 0.5)  # compute cost is compared too: the records have it
    assert "Warning" not in md


def test_baseline_option_picks_the_group_the_others_are_compared_with(tmp_path: Path, capsys) -> None:
    root, out = tmp_path / "runs", tmp_path / "out"
    write_sweep(root, SWEEP)
    assert main([str(root), "--out", str(out), "--baseline", "loss_weights.alpha=0.7", "--no-plots"]) == 0
    md = (out / "results.md").read_text()
    diff = np.mean(SWEEP[0.3]) - np.mean(SWEEP[0.7])
    assert sentence(md, 0.3).startswith(f"- α=0.3 vs α=0.7 (baseline): {diff:+.2f} PPL,")
    assert sentence(md, 0.3) in capsys.readouterr().out  # the words are printed as well
    assert "Baseline: α=0.7 (n=4;" in md


def test_groups_under_three_runs_are_warned_about_and_never_called_significant(tmp_path: Path) -> None:
    # α=0.5 is far from the baseline (its p is tiny) but has 2 runs; α=0.7 has 1 run: no test at all.
    write_sweep(tmp_path, {0.3: [25.0, 25.01, 25.02], 0.5: [40.0, 40.01], 0.7: [20.0]})
    res = write_results([tmp_path], tmp_path, plots=False)
    groups = res.groups.set_index("loss_weights.alpha")
    assert groups.loc[0.5, "ppl_p_holm"] < 0.05 and not groups.loc[0.5, "ppl_significant"]
    md = (tmp_path / "results.md").read_text()
    assert "**Warning**: fewer than 3 runs in α=0.5 (n=2), α=0.7 (n=1)" in md
    ppl_part, compute_part = sentence(md, 0.5).split("; ")
    assert "PPL, 95% CI [" in ppl_part and ppl_part.endswith("(Holm): not claimed (n < 3)")
    assert compute_part.endswith("not claimed (n < 3)")
    assert sentence(md, 0.7).startswith(
        "- α=0.7 vs α=0.3 (baseline): -5.01 PPL: no test: a t-test needs at least 2 runs per group (n=1, baseline n=3)"
    )
    section = md.split("## Significance vs baseline")[1].split("## Threshold")[0]
    assert "nan" not in section.lower() and ": significant" not in section
    # A baseline of 2 runs: the 3-run group against it is not called significant either.
    res = write_results([tmp_path], tmp_path, baseline="loss_weights.alpha=0.5", plots=False)
    groups = res.groups.set_index("loss_weights.alpha")
    assert groups.loc[0.3, "ppl_p_holm"] < 0.05 and not groups.loc[0.3, "ppl_significant"]
    assert sentence((tmp_path / "results.md").read_text(), 0.3).split("; ")[0].endswith("not claimed (n < 3)")


def test_an_ok_record_without_a_finite_ppl_is_listed_as_failed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_sweep(tmp_path, {0.3: [25.0, 25.2, 24.9]})
    null, nan = record(0.3, 5, None), record(0.3, 6, 25.0)
    null["objective"] = None  # an objective on compute only: nothing else says the PPL is missing
    nan["metrics"]["ppl"] = nan["objective"]["values"][0] = math.nan  # written by json as NaN
    write(tmp_path / "null", null)
    write(tmp_path / "nan", nan)
    with caplog.at_level(logging.WARNING, logger="ease.results"):
        res = write_results([tmp_path], tmp_path, plots=False)
    runs = res.runs.set_index("run")
    assert runs.loc["null", "status"] == "nan" and runs.loc["null", "error"] == "ppl is null"
    assert runs.loc["nan", "status"] == "nan"
    assert res.groups["n"].tolist() == [3]  # the group's statistics count only runs with a PPL
    warned = [r.getMessage() for r in caplog.records]
    assert any(str(tmp_path / "null" / "metrics.json") in w and "ppl is null" in w for w in warned)
    assert "ppl is null" in (tmp_path / "results.md").read_text().split("## Failed runs")[1]


def test_generate_records_have_no_ppl_and_stay_ok(tmp_path: Path) -> None:
    rec = record(0.3, 0, None)
    rec.update(task="generate", objective=None)
    del rec["metrics"]["ppl"]
    write(tmp_path / "gen", rec)
    res = write_results([tmp_path], tmp_path, plots=False)
    assert res.runs["status"].tolist() == ["ok"]


def one_error_line(capsys: pytest.CaptureFixture, *words: str) -> None:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ease-results: error: "), captured.err
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in captured.out + captured.err


def test_bad_paths_give_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_sweep(tmp_path / "runs", {0.3: [25.0]})
    (tmp_path / "notes.txt").write_text("not a folder")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "notes.txt")]) == 1
    one_error_line(capsys, "--out", "notes.txt", "is a file")
    assert (tmp_path / "notes.txt").read_text() == "not a folder"
    assert main([str(tmp_path / "notes.txt"), "--out", str(tmp_path / "o")]) == 1
    one_error_line(capsys, "notes.txt", "is a file, not a folder")
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    one_error_line(capsys, "no such folder", "missing")
    assert not (tmp_path / "o").exists()  # refused before anything was written
    one_record = tmp_path / "runs" / "a0.3_s0" / "metrics.json"  # a metrics.json itself is a valid input
    assert main([str(one_record), "--out", str(tmp_path / "o"), "--no-plots"]) == 0


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda r: r.update(status=["ok"]), "status is not a string"),
        (lambda r: r.update(objective=[25.0]), "objective is not a mapping"),
        (lambda r: r["objective"].update(values=25.0), "objective.values is not a list"),
        (lambda r: r.update(overrides="loss_weights.alpha=0.3"), "overrides is not a list"),
        (lambda r: r.update(seed="zero"), "seed is not an integer"),
        (lambda r: r["metrics"].update(layer_weights=[0.3, 0.7]), "layer_weights"),
        (lambda r: r["metrics"].update(layer_weights={"first": 0.3}), "layer_weights"),
        (lambda r: r["metrics"].update(threshold_analysis=[0.5, 0.9]), "threshold_analysis"),
        (lambda r: r["metrics"].update(threshold_analysis={"0.5": 20.0}), "threshold_analysis"),
    ],
)
def test_malformed_records_are_skipped_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture, change, why: str
) -> None:
    write_sweep(tmp_path / "runs", {0.3: [25.0]})
    bad = record(0.3, 1, 25.0)
    change(bad)
    write(tmp_path / "runs" / "bad", bad)
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and str(tmp_path / "runs" / "bad" / "metrics.json") in skipped[0] and why in skipped[0]


def test_curve_points_with_text_values_do_not_break_the_threshold_table(tmp_path: Path) -> None:
    rec = record(0.3, 0, 25.0)
    rec["metrics"]["threshold_analysis"][0]["ppl"] = "n/a"
    write(tmp_path / "r", rec)
    res = write_results([tmp_path], tmp_path, plots=False)
    assert res.thresholds["ppl_mean"].isna().tolist() == [True, False]


def test_find_baseline_by_group_string_or_key_value_and_falls_back_to_the_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    groups = pd.DataFrame({"group": ["a=1 b=x", "a=1 b=y", "a=2 b=y"], "a": [1, 1, 2], "b": ["x", "y", "y"]})
    assert find_baseline(groups, ["a", "b"], None) == 0
    assert find_baseline(groups, ["a", "b"], "a=2 b=y") == 2  # the `group` string of results_groups.csv
    assert find_baseline(groups, ["a", "b"], "b=y") == 1  # the first group that has it
    assert find_baseline(groups, ["a", "b"], "a=1,b=y") == 1
    with caplog.at_level(logging.WARNING, logger="ease.results"):
        assert find_baseline(groups, ["a", "b"], "a=3") == 0
        assert find_baseline(groups, ["a", "b"], "c=1") == 0
    assert len(caplog.records) == 2 and all("first group" in r.getMessage() for r in caplog.records)
