"""ease.results: records -> one row per run, seed groups, seed 003's tables, Pareto front, plots, bad files."""

import json
import logging
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest

from ease.results import Results
from ease.results.cli import main, write_results
from ease.results.group import pareto_mask

PPL = {(0.3, 0): 25.0, (0.3, 1): 24.0, (0.3, 2): 24.5, (0.7, 0): 23.0, (0.7, 1): 22.2, (0.7, 2): 23.9}


def curve(ppl: float) -> list[dict]:
    return [
        {"threshold": t, "ppl": ppl + 10 * (1 - t), "acc": 0.3, "shallow_ratio": 1 - t, "compute_cost": 0.3 + t / 2}
        for t in (0.5, 0.9)
    ]


def record(alpha: float, seed: int, ppl: float | None, status: str = "ok", extra: list[str] = ()) -> dict:
    overrides = ["+sweep=exp5", f"loss_weights.alpha={alpha}", f"seed={seed}", *extra]
    metrics = {
        "ppl": ppl,
        "acc": 0.3 + alpha / 10,
        "shallow_ratio": alpha / 2 + seed / 100,
        "compute_cost": 1 - alpha / 3 - seed / 100,
        "loss": 3.0,
        "test": {"ppl": (ppl or 0) + 1, "acc": 0.3},
        "layer_weights": {"1": alpha, "2": 0.0, "3": 1 - alpha},
        "threshold_analysis": curve(ppl or 0),
        "epochs_run": 5,
    }
    values = [ppl] if status == "ok" else None
    return {
        "status": status,
        "error": None if status == "ok" else "ValueError: boom",
        "task": "train",
        "metrics": metrics if status == "ok" else {},
        "objective": {"names": ["ppl"], "values": values} if values else None,
        "config": {},
        "overrides": overrides,
        "seed": seed,
    }


def write(folder: Path, rec: dict | str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(rec if isinstance(rec, str) else json.dumps(rec))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for i, ((alpha, seed), ppl) in enumerate(PPL.items()):
        write(root / str(i), record(alpha, seed, ppl))
    write(root / "6", record(0.5, 0, None, status="failed"))
    return root


def test_one_row_per_run_and_seed_groups_match_a_manual_mean_and_std(sweep: Path) -> None:
    res = write_results([sweep], sweep, plots=False)
    assert len(res.runs) == 7 and res.params == ["loss_weights.alpha"]
    assert sorted(res.runs["status"]) == ["failed"] + ["ok"] * 6
    groups = res.groups.set_index("loss_weights.alpha")
    assert list(groups.index) == [0.3, 0.7]  # the failed α=0.5 run forms no group
    for alpha in (0.3, 0.7):
        ppls = [p for (a, _), p in PPL.items() if a == alpha]
        shallow = [alpha / 2 + s / 100 for (a, s) in PPL if a == alpha]
        assert groups.loc[alpha, "n"] == 3
        assert groups.loc[alpha, "ppl_mean"] == pytest.approx(statistics.mean(ppls))
        assert groups.loc[alpha, "ppl_std"] == pytest.approx(statistics.stdev(ppls))
        assert groups.loc[alpha, "shallow_ratio_std"] == pytest.approx(statistics.stdev(shallow))
        assert groups.loc[alpha, "test_ppl_mean"] == pytest.approx(statistics.mean(ppls) + 1)
    csv = pd.read_csv(sweep / "results.csv")
    assert len(csv) == 7 and {"run", "status", "seed", "overrides", "loss_weights.alpha", "ppl"} <= set(csv.columns)


def md_table(md: str, first_column: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header starts with `first_column`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} "))
    cols = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(cols, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_markdown_has_seed_003s_layouts_and_lists_failures(sweep: Path) -> None:
    res = write_results([sweep], sweep, plots=False)
    md = (sweep / "results.md").read_text()
    main_rows = md_table(md, "α")
    assert list(main_rows[0]) == ["α", "L1 weight", "L3 weight", "PPL", "Shallow%", "Compute%", "n"]
    ppls = [23.0, 22.2, 23.9]
    shallow = [100 * (0.35 + s / 100) for s in range(3)]
    compute = [100 * (1 - 0.7 / 3 - s / 100) for s in range(3)]
    assert main_rows[1] == {
        "α": "0.7",
        "L1 weight": "70%",
        "L3 weight": "30%",
        "PPL": f"{statistics.mean(ppls):.2f} ± {statistics.stdev(ppls):.2f}",
        "Shallow%": f"{statistics.mean(shallow):.1f} ± {statistics.stdev(shallow):.1f}",
        "Compute%": f"{statistics.mean(compute):.1f} ± {statistics.stdev(compute):.1f}",
        "n": "3",
    }
    assert "ValueError: boom" in md.split("## Failed runs")[1]
    # Threshold table: mean over seeds of each run's curve point.
    threshold_rows = md_table(md.split("## Threshold analysis")[1], "α")
    assert list(threshold_rows[0]) == ["α", "Threshold", "PPL", "Shallow%", "Compute%", "n"]
    assert len(threshold_rows) == 4  # 2 α × 2 thresholds
    t = res.thresholds.set_index(["loss_weights.alpha", "threshold"])
    assert t.loc[(0.7, 0.9), "ppl_mean"] == pytest.approx(statistics.mean(ppls) + 1.0)
    assert t.loc[(0.7, 0.9), "n"] == 3


def test_corrupt_and_half_written_records_are_skipped_with_a_warning(
    sweep: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(sweep / "7", '{"status": "ok", "metrics": {"ppl": 1')  # cut off mid-write
    write(sweep / "8", "[1, 2, 3]")  # JSON, but no run record
    (sweep / "9" / ".hydra").mkdir(parents=True)  # a job killed before it wrote anything
    with caplog.at_level(logging.WARNING, logger="ease.results"):
        res = write_results([sweep], sweep, plots=False)
    assert len(res.runs) == 7
    assert sorted(Path(f).parent.name for f, _ in res.skipped) == ["7", "8"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "7" in warned and "8" in warned and "skipping" in warned
    md = (sweep / "results.md").read_text()
    assert "Unreadable records" in md and "killed or still running" in md


def test_results_are_written_atomically(sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = write_results([sweep], sweep, plots=False)
    assert isinstance(old, Results) and (sweep / "results.csv").is_file()
    before = (sweep / "results.csv").read_text()

    def crash_half_way(self: pd.DataFrame, path: Path, **kwargs) -> None:
        Path(path).write_text("run,ppl\nnew,")
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash_half_way)
    with pytest.raises(RuntimeError):
        write_results([sweep], sweep, plots=False)
    assert (sweep / "results.csv").read_text() == before  # the old table is intact
    assert not [p.name for p in sweep.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind


def test_pareto_front_matches_brute_force() -> None:
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 3.0), (2.5, 4.0), (4.0, 1.0), (math.nan, 0.5), (4.0, 1.0)]
    mask = pareto_mask([p[0] for p in pts], [p[1] for p in pts])
    for i, (x, y) in enumerate(pts):
        finite = not (math.isnan(x) or math.isnan(y))
        dominated = any(
            (a <= x and b <= y and (a < x or b < y)) for j, (a, b) in enumerate(pts) if j != i and not math.isnan(a)
        )
        assert mask[i] == (finite and not dominated), (x, y)


def test_multi_objective_records_give_a_pareto_table_and_plots(tmp_path: Path) -> None:
    root = tmp_path / "pareto"
    points = {(0.2, 0.5): (30.0, 0.40), (0.4, 0.9): (25.0, 0.70), (0.6, 0.7): (28.0, 0.75), (0.8, 0.95): (22.0, 0.95)}
    for i, ((alpha, thr), (ppl, cost)) in enumerate(points.items()):
        rec = record(alpha, 0, ppl, extra=[f"routing.threshold={thr}"])
        rec["metrics"]["compute_cost"] = cost
        rec["objective"] = {"names": ["ppl", "compute_cost"], "values": [ppl, cost]}
        write(root / str(i), rec)
    res = write_results([root], root)
    assert sorted(res.pareto["ppl_mean"]) == [22.0, 25.0, 30.0]  # (28, 0.75) is beaten by (25, 0.70)
    md = (root / "results.md").read_text()
    pareto = md.split("## Pareto front")[1].split("##")[0]
    assert "28.00" not in pareto and all(f"{p:.2f}" in pareto for p in (22.0, 25.0, 30.0))
    for name in ("ppl_vs_compute.png", "threshold_curves.png"):
        assert (root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_runs_of_one_checkpoint_count_their_curve_once(tmp_path: Path) -> None:
    root = tmp_path / "thr"
    for i, t in enumerate((0.5, 0.7, 0.9)):
        rec = record(0.7, 0, 20.0 + t, extra=[f"routing.threshold={t}", "checkpoint=/x/checkpoint.pt"])
        rec["overrides"] = [o for o in rec["overrides"] if not o.startswith("loss_weights")]
        rec["task"] = "eval"
        rec["metrics"]["checkpoint"] = "/x/checkpoint.pt"
        rec["metrics"]["threshold_analysis"] = curve(20.0)
        write(root / str(i), rec)
    res = write_results([root], root, plots=False)
    assert res.params == ["routing.threshold"] and len(res.groups) == 3
    assert list(res.thresholds["n"]) == [1, 1]  # one checkpoint, one curve
    md = (root / "results.md").read_text()
    assert next(line for line in md.splitlines() if line.startswith("| Threshold"))


def test_baseline_column_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "lr"
    ppl = {"decreasing": 18.5, "increasing": 21.1, "uniform": 23.0}
    for i, (kind, p) in enumerate(ppl.items()):
        write(root / str(i), record(0.7, 0, p, extra=[f"lr_scales={kind}"]))
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--baseline", "lr_scales=uniform", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "vs baseline" in printed and f"{100 * (23.0 - 18.5) / 23.0:+.1f}%" in printed
    assert (out / "results.csv").is_file() and (out / "results.md").is_file()
    assert not (out / "ppl_vs_compute.png").exists()
    assert main([str(tmp_path / "empty_dir_that_is_missing"), "--out", str(out)]) == 1
