"""Sweep workers started at the same moment on a fresh study database: no start-up race.

Optuna's `RDBStorage` creates its schema (`create_all`, then the alembic version row) when it opens a database.
Several workers opening a fresh database together used to fail on the tables, types or row that another worker
created a moment before (`table studies already exists`, `UNIQUE constraint failed: alembic_version...`,
PostgreSQL's `UniqueViolation pg_type_typname_nsp_index`). `ease.app.studies.open_storage` retries those.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from pg_server import postgres_server, require_postgres

from ease.app import studies

N_WORKERS, N_STARTS = 3, 10

# Each worker: for every URL, wait for the shared start time, open the storage, create-or-load the study and ask
# for one trial (what a sweep does first). Prints one JSON line: its errors and its warnings.
WORKER = r"""
import json, sys, time, warnings
import optuna
from ease.app.studies import open_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
urls, start, gap, retries = json.loads(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
errors, caught = [], []
for i, url in enumerate(urls):
    time.sleep(max(0.0, start + i * gap - time.time()))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            storage = open_storage(url, retries=retries)
            study = optuna.create_study(study_name="shared", storage=storage, load_if_exists=True)
            study.tell(study.ask(), 1.0)
        except Exception as err:
            errors.append(f"{i}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    # The drivers' ResourceWarnings are about earlier rounds' connections being garbage-collected, not this start.
    caught += [f"{i}: {w.category.__name__}: {w.message}" for w in seen
               if w.category.__name__ not in ("ExperimentalWarning", "ResourceWarning")]  # fmt: skip
print(json.dumps({"errors": errors, "warnings": caught}))
"""


def start_together(urls: list[str], retries: int = studies.SCHEMA_RETRIES) -> list[dict]:
    """N_WORKERS processes, each opening every URL in turn, all at the same moments."""
    # Imports take about a second per process on this CPU; every worker waits for the same start time.
    start, gap = time.time() + 5.0, 0.4
    args = [json.dumps(urls), str(start), str(gap), str(retries)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, *args], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(N_WORKERS)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def check_no_race(results: list[dict], urls: list[str]) -> None:
    assert [r["errors"] for r in results] == [[]] * N_WORKERS
    assert [r["warnings"] for r in results] == [[]] * N_WORKERS
    for url in urls:  # one study per database, holding every worker's trial exactly once
        trials = optuna.load_study(study_name="shared", storage=url).get_trials(deepcopy=False)
        assert sorted(t.number for t in trials) == list(range(N_WORKERS))
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def test_workers_start_together_on_fresh_sqlite_studies(tmp_path: Path) -> None:
    urls = [f"sqlite:///{tmp_path / f'start{i}.db'}" for i in range(N_STARTS)]
    check_no_race(start_together(urls), urls)


def test_workers_start_together_on_fresh_postgresql_databases() -> None:
    require_postgres()
    import psycopg

    with postgres_server() as url:
        plain = url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(plain, autocommit=True) as conn:
            for i in range(N_STARTS):
                conn.execute(f"CREATE DATABASE start{i}")
        base = url.rsplit("/", 1)[0]
        urls = [f"{base}/start{i}" for i in range(N_STARTS)]
        check_no_race(start_together(urls), urls)


def test_open_storage_retries_only_a_schema_race(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []
    real = optuna.storages.RDBStorage

    def flaky(url: str) -> optuna.storages.RDBStorage:
        calls.append(url)
        if len(calls) <= 2:
            raise RuntimeError("(sqlite3.OperationalError) table studies already exists")
        return real(url)

    monkeypatch.setattr(optuna.storages, "RDBStorage", flaky)
    monkeypatch.setattr(studies.time, "sleep", lambda s: None)
    url = f"sqlite:///{tmp_path / 'a.db'}"
    assert isinstance(studies.open_storage(url), real)
    assert len(calls) == 3

    def broken(url: str) -> None:
        calls.append(url)
        raise RuntimeError("connection refused")

    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    with pytest.raises(ValueError, match=r"^hydra\.sweeper\.storage: cannot open sqlite:///.*: connection refused$"):
        studies.open_storage(url)
    assert len(calls) == 1  # not a race: no retry

    def always_racing(url: str) -> None:
        calls.append(url)
        raise RuntimeError('(psycopg.errors.DuplicateTable) relation "studies" already exists')

    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", always_racing)
    with pytest.raises(ValueError, match=r"hydra\.sweeper\.storage: cannot open .*already exists"):
        studies.open_storage(url, retries=3)
    assert len(calls) == 4
