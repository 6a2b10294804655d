"""Pruned sweeps: each job reports its evaluations to its Optuna trial and stops when the pruner says so; sweeps
whose jobs all ran exit 0 with a one-line summary; bad sweep settings are one line.

The decisions are checked against plain re-implementations of the pruners' rules over the stored intermediate
values, not just against "something was pruned".
"""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import FAST, train_py
from optuna.trial import TrialState

from ease.app.studies import study_trials

# 4 evaluations per trial (epochs), 6 batches each.
RUN = [*FAST, "train.max_epochs=4", "train.patience=10", "data.synthetic_tokens=6000", "threads=1"]


def sweep(tmp_path: Path, *overrides: str, name: str = "alpha_optuna", ok: bool = True) -> subprocess.CompletedProcess:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    proc = train_py(
        "-m", f"+sweep={name}", *RUN, f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.sweeper.storage={url}",
        "hydra.sweeper.study_name=s", *overrides, timeout=600,
    )  # fmt: skip
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def trials(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    return study_trials(f"sqlite:///{tmp_path / 'study.db'}", "s")


def records(tmp_path: Path) -> dict[int, dict]:
    """metrics.json of every job, by trial number (the job's `optuna_trial`)."""
    out = {}
    for path in (tmp_path / "sweep").glob("*/metrics.json"):
        record = json.loads(path.read_text())
        out[record["config"]["optuna_trial"]] = record
    return out


def summary(proc: subprocess.CompletedProcess) -> tuple[int, int, int, int]:
    found = re.findall(
        r"^sweep: (\d+) trials: (\d+) complete, (\d+) failed, (\d+) pruned \(study s\)$", proc.stdout, re.M
    )
    assert len(found) == 1, proc.stdout[-3000:]
    return tuple(int(n) for n in found[0])


def test_threshold_pruner_stops_every_trial_at_its_first_allowed_evaluation(tmp_path: Path) -> None:
    # Validation PPL is always above 1: every trial is pruned at the first step the pruner looks at (step 2).
    pruner = ["hydra.sweeper.pruner=threshold", "hydra.sweeper.pruner_args={upper: 1.0, n_warmup_steps: 2}"]
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=3", *pruner)
    assert summary(proc) == (3, 0, 0, 3)
    by_number = records(tmp_path)
    assert sorted(by_number) == [0, 1, 2]
    for t in trials(tmp_path):
        assert t.state == TrialState.PRUNED and t.user_attrs["pruned_at"] == 2
        record = by_number[t.number]
        assert record["status"] == "pruned" and record["metrics"]["pruned_at"] == 2
        history = record["metrics"]["history"]
        # What the job reported is its evaluations' val PPL, and the trial's value is the last one (Optuna's rule).
        assert t.intermediate_values == {row["epoch"]: row["val_ppl"] for row in history}
        assert len(history) == 2 and t.value == history[-1]["val_ppl"] == record["metrics"]["ppl"]
        assert t.user_attrs["run_dir"] == str(tmp_path / "sweep" / str(t.number))
    # The tables list the pruned runs apart from the failed ones.
    md = (tmp_path / "sweep" / "results.md").read_text()
    assert "## Pruned runs" in md and md.split("## Failed runs")[1].split("##")[0].strip() == "(none)"


def _median_rule_prunes(value: float, earlier: list[list[float]], step: int, warmup: int) -> bool:
    """MedianPruner(n_startup_trials=len(earlier) >= 2, n_warmup_steps=warmup) for a minimised objective: prune when
    the value is above the median of the completed trials' values at the same step."""
    if step <= warmup - 1 or len(earlier) < 2:
        return False
    return value > float(np.median([values[step - 1] for values in earlier]))


def test_median_pruner_decisions_follow_the_median_rule(tmp_path: Path) -> None:
    # A wide α range gives trials that clearly differ; the basic launcher runs them one after another.
    pruner = ["hydra.sweeper.pruner=median", "hydra.sweeper.pruner_args={n_startup_trials: 2, n_warmup_steps: 1}"]
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=6", "loss_weights.alpha=interval(0.0, 1.0)", *pruner)
    done = sorted(trials(tmp_path), key=lambda t: t.number)
    counts = summary(proc)
    assert counts[0] == 6 and counts[2] == 0 and counts[1] + counts[3] == 6
    completed: list[list[float]] = []
    for t in done:
        values = [t.intermediate_values[s] for s in sorted(t.intermediate_values)]
        expected = next((s for s, v in enumerate(values, 1) if _median_rule_prunes(v, completed, s, warmup=1)), None)
        if expected is None:
            assert t.state == TrialState.COMPLETE and len(values) == 4, t.number
            completed.append(values)
        else:
            assert t.state == TrialState.PRUNED and t.user_attrs["pruned_at"] == expected == len(values), t.number
    assert counts[3] == sum(t.state == TrialState.PRUNED for t in done) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ease_joblib", "ease_fork"])
def test_pruning_with_two_parallel_workers(tmp_path: Path, launcher: str) -> None:
    pruner = ["hydra.sweeper.pruner=threshold", "hydra.sweeper.pruner_args={upper: 1.0, n_warmup_steps: 2}"]
    proc = sweep(tmp_path, f"hydra/launcher={launcher}", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_trials=4", *pruner)
    assert summary(proc) == (4, 0, 0, 4)
    assert all(t.state == TrialState.PRUNED and t.user_attrs["pruned_at"] == 2 for t in trials(tmp_path))
    assert all(r["status"] == "pruned" for r in records(tmp_path).values())


@pytest.mark.slow
def test_pruning_with_the_submitit_local_launcher(tmp_path: Path) -> None:
    # submitit's local executor runs each job in its own process, as on SLURM (the `slurm` extra); two at a time.
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pruner = ["hydra.sweeper.pruner=threshold", "hydra.sweeper.pruner_args={upper: 1.0, n_warmup_steps: 2}"]
    launcher = ["hydra/launcher=submitit_local", "hydra.sweeper.n_jobs=2", "hydra.launcher.tasks_per_node=1"]
    proc = sweep(tmp_path, *launcher, "hydra.sweeper.n_trials=4", *pruner)
    assert summary(proc) == (4, 0, 0, 4)
    assert all(t.state == TrialState.PRUNED and t.user_attrs["pruned_at"] == 2 for t in trials(tmp_path))
    assert all(r["status"] == "pruned" for r in records(tmp_path).values())


def test_without_a_pruner_trials_complete_and_carry_their_run_and_metrics(tmp_path: Path) -> None:
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=2")
    assert summary(proc) == (2, 2, 0, 0)
    by_number = records(tmp_path)
    for t in trials(tmp_path):
        metrics = by_number[t.number]["metrics"]
        assert t.state == TrialState.COMPLETE and t.value == metrics["ppl"] == t.user_attrs["ppl"]
        assert t.user_attrs["compute_cost"] == metrics["compute_cost"]
        assert t.intermediate_values == {row["epoch"]: row["val_ppl"] for row in metrics["history"]}


def test_a_grid_sweep_with_a_failing_last_trial_exits_0(tmp_path: Path) -> None:
    # The grid's last point fails validation; the grid sampler then stops the study from inside `tell`.
    grid = ["hydra/sweeper/sampler=grid", "hydra.sweeper.sampler.seed=0", "loss_weights.alpha=choice(0.5,1.5)"]
    proc = sweep(tmp_path, *grid, "train.max_epochs=1")
    assert summary(proc) == (2, 1, 1, 0)
    assert sorted(t.state.name for t in trials(tmp_path)) == ["COMPLETE", "FAIL"]


def test_a_sweep_where_no_trial_completes_exits_0(tmp_path: Path) -> None:
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=2", "train.grad_accum=0")  # every job refuses its config
    assert summary(proc) == (2, 0, 2, 0)


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials: must be an int >= 1"),
        (["hydra.sweeper.pruner=medain"], "hydra.sweeper.pruner: must be one of none, median, percentile"),
        (
            ["hydra.sweeper.pruner=median", "hydra.sweeper.pruner_args={warmup: 2}"],
            "hydra.sweeper.pruner_args: MedianPruner: ",
        ),
        (
            ["hydra.sweeper.pruner_args={upper: 2}"],
            "hydra.sweeper.pruner_args: given, but hydra.sweeper.pruner is none",
        ),
        (["loss_weights.alpha=interval(0.9,0.1)"], "loss_weights.alpha: not a valid search space"),
        (["loss_weights.alhpa=interval(0.1,0.9)"], "loss_weights.alhpa: not a config key, cannot be searched"),
    ],
)
def test_bad_sweep_settings_are_one_line(tmp_path: Path, overrides: list[str], line: str) -> None:
    proc = sweep(tmp_path, *overrides, ok=False)
    assert proc.returncode != 0
    errors = [s for s in proc.stderr.splitlines() if s.startswith("error: ")]
    assert len(errors) == 1 and line in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "sweep").glob("*/metrics.json"))  # refused before any job ran
    assert trials(tmp_path) == []  # and before any trial was asked: none is left RUNNING


def test_a_pruner_on_a_multi_objective_sweep_is_one_line(tmp_path: Path) -> None:
    proc = sweep(tmp_path, "hydra.sweeper.pruner=median", name="pareto", ok=False)
    errors = [s for s in proc.stderr.splitlines() if s.startswith("error: ")]
    assert len(errors) == 1 and "hydra.sweeper.pruner: Optuna prunes single-objective studies only" in errors[0]


def test_constraints_reach_the_sampler_and_the_records(tmp_path: Path) -> None:
    # Every run satisfies the first and fails the second: each trial's constraint values are Optuna's convention
    # (<= 0 holds) computed from its record, and the tables mark the runs infeasible.
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.constraints=['ppl <= 1000', 'acc >= 0.99']")
    assert summary(proc) == (2, 2, 0, 0)
    by_number = records(tmp_path)
    for t in trials(tmp_path):
        m = by_number[t.number]["metrics"]
        assert t.system_attrs["constraints"] == [m["ppl"] - 1000.0, 0.99 - m["acc"]]
        assert m["feasible"] is False and m["constraints"]["ppl <= 1000"]["satisfied"] is True
        assert m["constraints"]["acc >= 0.99"] == {"value": 0.99 - m["acc"], "satisfied": False}
    main = (tmp_path / "sweep" / "results.md").read_text().split("\n## ")[1]
    header, _, *rows = [line for line in main.splitlines() if line.startswith("|")]
    column = [c.strip() for c in header.split("|")].index("Feasible")
    assert len(rows) == 2 and all(row.split("|")[column].strip() == "NO" for row in rows)


@pytest.mark.parametrize(
    ("value", "line"),
    [
        ("['compute <= 0.7']", "hydra.sweeper.constraints: 'compute <= 0.7' is not METRIC <= BOUND"),
        ("['compute_cost < 0.7']", "hydra.sweeper.constraints: 'compute_cost < 0.7' is not METRIC <= BOUND"),
    ],
)
def test_bad_constraints_are_one_line(tmp_path: Path, value: str, line: str) -> None:
    proc = sweep(tmp_path, f"hydra.sweeper.constraints={value}", ok=False)
    errors = [s for s in proc.stderr.splitlines() if s.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1 and line in errors[0], proc.stderr[-3000:]


def test_constraints_need_a_sampler_that_takes_them(tmp_path: Path) -> None:
    proc = sweep(tmp_path, "hydra/sweeper/sampler=random", "hydra.sweeper.constraints=['ppl <= 100']", ok=False)
    errors = [s for s in proc.stderr.splitlines() if s.startswith("error: ")]
    assert len(errors) == 1 and "the TPE, NSGA-II and GP samplers take constraints" in errors[0], proc.stderr[-3000:]
