"""Sweeps: `python train.py -m +sweep=NAME` with Optuna studies in SQLite, failures, resume, Pareto tables."""

import json
import subprocess
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import FAST, REPO, compose, train_py
from omegaconf import OmegaConf
from optuna.trial import TrialState

from ease.app.callbacks import OptunaStudyCallback
from ease.app.studies import STALE_REASON, fail_stale_trials, study_trials
from ease.results import pareto_mask

SWEEPS = REPO / "sweeps"
TINY = [*FAST, "data.synthetic_tokens=2000", "data.seq_len=16", "save_checkpoint=false"]


def sweep(name: str, sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = train_py("-m", f"+sweep={name}", *TINY, f"hydra.sweep.dir={sweep_dir}", *overrides, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def states(url: str, study: str) -> list[str]:
    return [t.state.name for t in study_trials(url, study)]


def test_sweep_files_say_what_they_reproduce_and_how_to_run() -> None:
    names = sorted(p.stem for p in SWEEPS.glob("*.yaml"))
    required = ["alpha_grid", "alpha_optuna", "threshold", "hard_ratio", "pareto", "exp5", "exp6", "layer_lr"]
    assert set(required) <= set(names)
    assert (REPO / "conf" / "sweep").resolve() == SWEEPS.resolve()
    for name in names:
        text = (SWEEPS / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n# "), name
        header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
        assert f"python train.py -m +sweep={name}" in header, name


def test_optuna_storage_is_under_the_project_whatever_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = compose(["+sweep=alpha_optuna"], hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper.storage == f"sqlite:///{REPO}/outputs/optuna/alpha_optuna.db"
    assert sweeper.study_name == "alpha_optuna" and sweeper.max_failure_rate == 1.0
    assert sweeper.sampler.multivariate and sweeper.sampler.constant_liar
    # Seeded: 0 plus the trials already in the study (see the resume test).
    assert OmegaConf.to_container(sweeper.sampler)["seed"] == "${ease_resume_seed:0}"


def test_callback_creates_the_sqlite_folder_and_fails_stale_trials(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'not' / 'yet' / 'there.db'}"
    config = OmegaConf.create(
        {"hydra": {"sweeper": {"_target_": "x.optuna_sweeper.OptunaSweeper", "storage": url, "study_name": "s"}}}
    )
    OptunaStudyCallback().on_multirun_start(config)
    assert (tmp_path / "not" / "yet").is_dir()
    study = optuna.create_study(study_name="s", storage=url)
    done = study.ask()
    study.tell(done, 1.0)
    study.ask()  # left RUNNING, as by a killed sweep
    assert fail_stale_trials(url, "s", older_than_s=3600) == []  # too recent for a long grace period
    OptunaStudyCallback().on_multirun_start(config)
    trials = study_trials(url, "s")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs["fail_reason"] == STALE_REASON
    # The sampler seed of the next sweep: the base plus the trials already in the study.
    seeded = OmegaConf.merge(config, {"hydra": {"sweeper": {"sampler": {"seed": "${ease_resume_seed:7}"}}}})
    assert seeded.hydra.sweeper.sampler.seed == 7 + 2


def test_tiny_optuna_sweep_leaves_four_complete_trials_and_resumes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db' / 'studies.db'}"
    common = ["hydra.sweeper.n_trials=4", f"hydra.sweeper.storage={url}", "hydra.sweeper.study_name=tiny"]
    sweep("alpha_optuna", tmp_path / "first", *common)
    assert states(url, "tiny") == ["COMPLETE"] * 4
    runs = pd.read_csv(tmp_path / "first" / "results.csv")
    assert len(runs) == 4 and (runs["status"] == "ok").all()
    alphas = sorted(t.params["loss_weights.alpha"] for t in study_trials(url, "tiny"))
    assert sorted(runs["loss_weights.alpha"]) == pytest.approx(alphas)

    optuna.load_study(study_name="tiny", storage=url).ask()  # a trial a killed sweep left RUNNING
    sweep("alpha_optuna", tmp_path / "second", *common[1:], "hydra.sweeper.n_trials=2")
    trials = study_trials(url, "tiny")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4 + ["FAIL"] + ["COMPLETE"] * 2
    assert len(pd.read_csv(tmp_path / "second" / "results.csv")) == 2
    # The resumed sweep's sampler is reseeded by the study's size: it does not replay the first start-up points.
    first, resumed = (
        [t.params["loss_weights.alpha"] for t in trials[:2]],
        [t.params["loss_weights.alpha"] for t in trials[5:]],
    )
    assert first != resumed


def test_a_failing_trial_is_recorded_fail_and_the_sweep_finishes_with_its_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    # The grid runs both values; α = 1.5 is rejected when the job validates its config.
    overrides = ["hydra/sweeper/sampler=grid", "hydra.sweeper.sampler.seed=0", "loss_weights.alpha=choice(0.5,1.5)"]
    sweep("alpha_optuna", tmp_path / "s", *overrides, f"hydra.sweeper.storage={url}")
    trials = {t.params["loss_weights.alpha"]: t.state for t in study_trials(url, "alpha_optuna")}
    assert trials == {0.5: TrialState.COMPLETE, 1.5: TrialState.FAIL}
    runs = pd.read_csv(tmp_path / "s" / "results.csv").set_index("loss_weights.alpha")
    assert runs.loc[1.5, "status"] == "failed" and "loss_weights.alpha: must be in [0, 1]" in runs.loc[1.5, "error"]
    md = (tmp_path / "s" / "results.md").read_text()
    assert "must be in [0, 1], got 1.5" in md.split("## Failed runs")[1]


def test_multi_objective_sweep_writes_its_pareto_front(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    routing = "routing.analysis_thresholds=[0.05,0.1]"
    sweep("pareto", tmp_path / "s", "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage={url}", routing)
    trials = study_trials(url, "pareto")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 and all(len(t.values) == 2 for t in trials)
    groups = pd.read_csv(tmp_path / "s" / "results_groups.csv")
    front = groups[pareto_mask(groups["compute_cost_mean"], groups["ppl_mean"])]
    pareto_md = (tmp_path / "s" / "results.md").read_text().split("## Pareto front")[1].split("\n## ")[0]
    body = [line for line in pareto_md.splitlines() if line.startswith("|")][2:]
    assert len(body) == len(front) >= 1
    for ppl in front["ppl_mean"]:
        assert f"{ppl:.2f}" in pareto_md
    assert (tmp_path / "s" / "ppl_vs_compute.png").is_file()
    records = [json.loads(p.read_text()) for p in (tmp_path / "s").glob("*/metrics.json")]
    assert all(r["objective"]["names"] == ["ppl", "compute_cost"] for r in records)


@pytest.mark.slow
def test_alpha_grid_runs_two_jobs_at_a_time_with_joblib(tmp_path: Path) -> None:
    sweep("alpha_grid", tmp_path / "s", "hydra/launcher=ease_joblib", "threads=1")
    runs = pd.read_csv(tmp_path / "s" / "results.csv")
    assert len(runs) == 6 and (runs["status"] == "ok").all()
    groups = pd.read_csv(tmp_path / "s" / "results_groups.csv")
    assert sorted(groups["loss_weights.alpha"]) == [0.3, 0.5, 0.7] and (groups["n"] == 2).all()


# Several sweep processes on one study (SQLite and a real PostgreSQL server) and a kill -9 of the controller:
# tests/test_sweep_workers.py.
