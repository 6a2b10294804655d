"""Several sweep processes on one Optuna study: SQLite on one machine, PostgreSQL across machines.

Each worker is a whole `python train.py -m` process with its own sweep folder; they share the study through
the storage URL. Nothing may be lost or run twice: every trial is COMPLETE, trial numbers are unique, and each
COMPLETE trial has exactly one metrics.json whose objective equals the trial's value.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import REPO
from pg_server import pg_bin_dir, postgres_server

N_WORKERS, TRIALS_EACH = 2, 3


def start_worker(storage: str, study: str, sweep_dir: Path, worker: int) -> subprocess.Popen:
    args = [
        sys.executable, str(REPO / "train.py"), "-m", "+sweep=alpha_optuna",
        "model=tiny", "data=synthetic", "data.synthetic_tokens=6000", "train.max_epochs=1", "progress=false",
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


def test_two_workers_share_a_sqlite_study(tmp_path: Path) -> None:
    run_workers_and_check(f"sqlite:///{tmp_path / 'study.db'}", tmp_path)


def test_two_workers_share_a_postgresql_study(tmp_path: Path) -> None:
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is the optional extra: pip install -e '.[postgres]'")
    if pg_bin_dir() is None:
        if os.environ.get("EASE_REQUIRE_POSTGRES") == "1":
            pytest.fail("EASE_REQUIRE_POSTGRES=1 but no PostgreSQL server binaries (apt-get install postgresql)")
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    with postgres_server() as url:
        run_workers_and_check(url, tmp_path)
