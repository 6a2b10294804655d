"""`hydra/launcher=ease_fork` (ease/app/launcher.py): jobs on workers forked from the sweep's controller."""

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import FAST, strip_timing, train_py
from killswitch import kill_after
from omegaconf import OmegaConf

from ease.app import launcher as launcher_module
from ease.app.launcher import ForkLauncher, worker_count

# alpha_grid cut to 4 jobs: 2 workers run 2 jobs each, so a worker's second job runs after its first, in-process.
GRID = ["+sweep=alpha_grid", "loss_weights.alpha=0.3,0.7", "seed=0,1", *FAST, "data.synthetic_tokens=2000",
        "data.seq_len=16", "save_checkpoint=false", "threads=1"]  # fmt: skip


def records(folder: Path) -> dict[tuple[str, ...], dict]:
    """The sweep's metrics.json records by their overrides, without wall-clock figures."""
    out = {}
    for path in folder.glob("*/metrics.json"):
        record = json.loads(path.read_text())
        out[tuple(sorted(record["overrides"]))] = record
    return out


def test_forked_workers_give_the_serial_sweeps_metrics_bit_for_bit(tmp_path: Path) -> None:
    for name, extra in (("serial", []), ("fork", ["hydra/launcher=ease_fork"])):
        proc = train_py("-m", *GRID, f"hydra.sweep.dir={tmp_path / name}", *extra, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    serial, fork = records(tmp_path / "serial"), records(tmp_path / "fork")
    assert len(serial) == 4 and serial.keys() == fork.keys()
    for key, record in serial.items():
        assert record["status"] == fork[key]["status"] == "ok"
        assert strip_timing(record["metrics"]) == strip_timing(fork[key]["metrics"]), key
        assert record["config"] == fork[key]["config"] and record["objective"] == fork[key]["objective"]
    # (Two workers sharing the jobs: test_jobs_keep_their_order_and_share_the_workers; tiny jobs may not overlap.)
    assert (tmp_path / "fork" / "results.md").is_file()


@pytest.mark.slow
def test_a_killed_worker_fails_the_sweep_in_one_line_instead_of_hanging(tmp_path: Path) -> None:
    proc = train_py("-m", *GRID, f"hydra.sweep.dir={tmp_path}", "hydra/launcher=ease_fork", *kill_after(1), timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: hydra.launcher: a worker process died")


@pytest.mark.parametrize("n_jobs", [0, -2, 1.5, True, "2"])
def test_bad_n_jobs_is_one_line_naming_the_key(n_jobs: object) -> None:
    with pytest.raises(ValueError, match=r"^hydra\.launcher\.n_jobs: must be an int >= 1, or -1"):
        ForkLauncher(n_jobs=n_jobs)  # type: ignore[arg-type]


def test_bad_n_jobs_on_the_command_line_stops_before_any_job(tmp_path: Path) -> None:
    proc = train_py("-m", *GRID, f"hydra.sweep.dir={tmp_path}", "hydra/launcher=ease_fork", "hydra.launcher.n_jobs=0")
    assert proc.returncode == 1
    assert "hydra.launcher.n_jobs: must be an int >= 1, or -1 (one per CPU), got 0" in proc.stderr
    assert not list(tmp_path.glob("*/metrics.json"))


def test_a_preload_that_cannot_be_imported_is_one_line_before_any_job(tmp_path: Path) -> None:
    extra = ["hydra/launcher=ease_fork", "hydra.launcher.preload=[no_such_module_here]"]
    proc = train_py("-m", *GRID, f"hydra.sweep.dir={tmp_path}", *extra)
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: hydra.launcher.preload: cannot import 'no_such_module_here'")
    )
    assert not list(tmp_path.glob("*/metrics.json"))


def test_worker_count() -> None:
    assert [worker_count(2, jobs) for jobs in (1, 2, 6)] == [1, 2, 2]
    assert worker_count(-1, 1000) == os.cpu_count()
    assert worker_count(4, 3) == 3


def _job_pids(idx: int, overrides: list[str]) -> tuple[int, int, str, bool, bool]:
    """Stands in for `_run_job` in a forked worker: what the worker inherited and which process ran it."""
    time.sleep(0.3)  # long enough that both workers get jobs, even on a busy machine
    loaded = "colorsys" in sys.modules, "wave" in sys.modules
    return idx, os.getpid(), launcher_module._inherited["config"].marker, *loaded


def test_jobs_keep_their_order_and_share_the_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher_module, "_run_job", _job_pids)
    config = OmegaConf.create({"marker": "inherited", "hydra": {"hydra_logging": None, "verbose": False,
                                                                "sweep": {"dir": str(tmp_path)}}})  # fmt: skip
    for name in ("colorsys", "wave"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    launcher = ForkLauncher(n_jobs=2, preload=["colorsys"], import_while_running=["wave"])
    launcher.setup(hydra_context=SimpleNamespace(execution_whitelist=None), task_function=print, config=config)  # type: ignore[arg-type]
    runs = launcher.launch([[f"seed={i}"] for i in range(5)], initial_job_idx=10)
    assert [run[0] for run in runs] == [10, 11, 12, 13, 14]
    pids = {run[1] for run in runs}
    assert len(pids) == 2 and os.getpid() not in pids  # two forked workers, reused across the five jobs
    assert {run[2] for run in runs} == {"inherited"}  # the config came by fork, not by pickle
    # preload before the fork (every worker has it), import_while_running after (the controller alone)
    assert all(run[3] and not run[4] for run in runs) and "wave" in sys.modules
    assert launcher_module._inherited == {}


def _die(idx: int, overrides: list[str]) -> int:
    if idx == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return idx


def _fail_first(idx: int, overrides: list[str]) -> int:
    if idx == 0:
        raise ValueError("job 0 cannot start")
    time.sleep(0.3)
    Path(overrides[0]).touch()
    return idx


def test_a_job_that_raises_stops_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher_module, "_run_job", _fail_first)
    config = OmegaConf.create({"hydra": {"hydra_logging": None, "verbose": False, "sweep": {"dir": str(tmp_path)}}})
    launcher = ForkLauncher(n_jobs=1)
    launcher.setup(hydra_context=SimpleNamespace(execution_whitelist=None), task_function=print, config=config)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="job 0 cannot start"):
        launcher.launch([[str(tmp_path / f"ran{i}")] for i in range(8)], initial_job_idx=0)
    # The pool had handed the worker about 3 more jobs (running and queued); the rest were dropped.
    assert len(list(tmp_path.glob("ran*"))) <= 4


def test_a_killed_worker_raises_naming_its_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher_module, "_run_job", _die)
    config = OmegaConf.create({"hydra": {"hydra_logging": None, "verbose": False, "sweep": {"dir": str(tmp_path)}}})
    launcher = ForkLauncher(n_jobs=2)
    launcher.setup(hydra_context=SimpleNamespace(execution_whitelist=None), task_function=print, config=config)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"^hydra\.launcher: a worker process died .* job #1 \(seed=1\)"):
        launcher.launch([[f"seed={i}"] for i in range(4)], initial_job_idx=0)
