"""Sweeps that survive: several sweep processes on one Optuna study (SQLite on one machine, PostgreSQL across
machines), and a sweep controller killed with SIGKILL, then resumed.

Each worker is a whole `python train.py -m` process with its own sweep folder; they share the study through
the storage URL. Nothing may be lost or run twice: every trial is COMPLETE, trial numbers are unique, and each
COMPLETE trial has exactly one metrics.json whose objective equals the trial's value.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import FAST, REPO
from optuna.trial import TrialState
from pg_server import postgres_server, require_postgres

N_WORKERS, TRIALS_EACH = 2, 3


def start_worker(storage: str, study: str, sweep_dir: Path, worker: int) -> subprocess.Popen:
    args = [
        sys.executable, str(REPO / "train.py"), "-m", "+sweep=alpha_optuna", *FAST,
        "threads=1", f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={study}",
        f"hydra.sweeper.n_trials={TRIALS_EACH}", f"hydra.sweep.dir={sweep_dir}",
        # A shared study: only trials older than any real trial count as left behind by a killed sweep.
        "hydra.callbacks.optuna_study.stale_after_s=3600",
        # Each worker its own sampler seed, or both would propose the same random start-up points.
        f"hydra.sweeper.sampler.seed={worker}",
    ]  # fmt: skip
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_workers_and_check(storage: str, tmp_path: Path) -> None:
    workers = [start_worker(storage, "shared", tmp_path / f"w{i}", i) for i in range(N_WORKERS)]
    for w in workers:
        out, _ = w.communicate(timeout=600)
        assert w.returncode == 0, out[-3000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == N_WORKERS * TRIALS_EACH
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(N_WORKERS * TRIALS_EACH))
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("w*/*/metrics.json"))]
    assert len(records) == len(trials)
    assert all(r["status"] == "ok" for r in records)
    # Each trial's sampled α and value appear in exactly one record.
    by_record = sorted((r["config"]["loss_weights"]["alpha"], r["objective"]["values"][0]) for r in records)
    by_trial = sorted((t.params["loss_weights.alpha"], t.value) for t in trials)
    assert by_record == by_trial  # floats round-trip exactly through JSON and the database
    assert len({alpha for alpha, _ in by_trial}) == len(trials)  # no point was run twice


@pytest.mark.slow  # the same workers and checks as the PostgreSQL test below, which the default suite keeps
def test_two_workers_share_a_sqlite_study(tmp_path: Path) -> None:
    run_workers_and_check(f"sqlite:///{tmp_path / 'study.db'}", tmp_path)


def test_two_workers_share_a_postgresql_study(tmp_path: Path) -> None:
    require_postgres()
    with postgres_server() as url:
        run_workers_and_check(url, tmp_path)


def sweep_cmd(storage: str, sweep_dir: Path, n_trials: int) -> list[str]:
    return [
        sys.executable, str(REPO / "train.py"), "-m", "+sweep=alpha_optuna", "model=tiny", "data=synthetic",
        "data.synthetic_tokens=6000", "train.max_epochs=4", "train.patience=10", "progress=false", "threads=1",
        f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=killed", f"hydra.sweeper.n_trials={n_trials}",
        f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip


def ok_records(sweep_dir: Path) -> list[Path]:
    out = []
    for path in sorted(sweep_dir.glob("*/metrics.json")):
        try:
            if json.loads(path.read_text())["status"] == "ok":
                out.append(path)
        except ValueError:
            pass
    return out


# Polls for the moment to kill. The default suite keeps a left-RUNNING trial failed and a resumed sweep reseeded
# (test_sweeps.py) and SIGKILL then resume=true of a run (test_reliability.py).
@pytest.mark.slow
def test_kill_9_of_the_sweep_controller_then_resume(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first, second = tmp_path / "first", tmp_path / "second"
    controller = subprocess.Popen(sweep_cmd(storage, first, 6), cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        # Kill -9 once two trials are done and the third job has started (its trial is RUNNING).
        deadline = time.time() + 300
        while not (len(ok_records(first)) >= 2 and (first / "2").is_dir()):
            assert controller.poll() is None, "the sweep ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
        controller.send_signal(signal.SIGKILL)
        controller.wait(timeout=30)
    finally:
        controller.kill()
    done_before = {p: p.read_bytes() for p in ok_records(first)}
    study = optuna.load_study(study_name="killed", storage=storage)
    states_before = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert TrialState.RUNNING in states_before.values()
    complete_before = {t.number: t.value for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE}
    assert len(complete_before) == len(done_before) >= 2

    proc = subprocess.run(sweep_cmd(storage, second, 2), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = optuna.load_study(study_name="killed", storage=storage).get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    for number, state in states_before.items():  # the killed one is FAIL now, with the reason
        if state == TrialState.RUNNING:
            assert by_number[number].state == TrialState.FAIL
            assert "killed" in by_number[number].user_attrs["fail_reason"]
    for number, value in complete_before.items():  # completed trials stay, unchanged
        assert by_number[number].state == TrialState.COMPLETE and by_number[number].value == value
    assert sum(t.state == TrialState.COMPLETE for t in trials) == len(complete_before) + 2
    assert {p: p.read_bytes() for p in ok_records(first)} == done_before  # first sweep's records untouched

    tables = tmp_path / "tables"
    collect = [sys.executable, "-m", "ease.results", str(first), str(second), "--no-plots", "--out", str(tables)]
    subprocess.run(collect, cwd=REPO, check=True, capture_output=True, timeout=120)
    rows = pd.read_csv(tables / "results.csv")
    assert (rows["status"] == "ok").sum() == len(complete_before) + 2  # every completed trial of both runs
