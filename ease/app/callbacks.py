"""Hydra callbacks: the comparison tables at the end of every multirun, and Optuna study housekeeping."""

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ease.app.studies import register_resolvers

log = logging.getLogger("ease")


# Hydra instantiates the callbacks (importing this module) before the sweeper, whose sampler seed uses
# `${ease_resume_seed:0}`: registering here makes every `-m` run work even where nothing else registered it.
register_resolvers()


class ResultsTablesCallback(Callback):
    """Writes results.csv / results.md / plots into the sweep folder when a multirun ends.

    Hydra calls on_multirun_end also when the sweep failed part of the way, so the finished jobs
    always get their table.

    Args:
        baseline: `KEY=VALUE` naming the group the "vs baseline" column compares with (e.g. `lr_scales=uniform`).
    """

    def __init__(self, baseline: str | None = None) -> None:
        self.baseline = baseline

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir() or not any(p.is_dir() for p in sweep_dir.iterdir()):
            return  # refused before any job started (its one error line says why): no empty tables to write
        try:
            from ease.results import write_results

            write_results([sweep_dir], sweep_dir, echo=True, baseline=self.baseline)
        except Exception as err:  # a table must never turn a finished sweep into a crash
            log.warning("results tables for %s not written: %s: %s", sweep_dir, type(err).__name__, err)


class OptunaStudyCallback(Callback):
    """Before an Optuna sweep starts: create the SQLite folder and fail trials a killed sweep left RUNNING.

    Registered by `hydra/sweeper=ease_optuna`; does nothing under another sweeper or without storage.

    Args:
        stale_after_s: RUNNING trials older than this are failed (0: all of them, right for one sweep process
            per study). Processes sharing a study through a database URL need more than the longest trial;
            null turns the clean-up off.
    """

    def __init__(self, stale_after_s: float | None = 0.0) -> None:
        self.stale_after_s = stale_after_s

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        if "optuna" not in str(OmegaConf.select(sweeper, "_target_", default="")).lower():
            return
        storage = OmegaConf.select(sweeper, "storage")
        if not storage:
            return
        from ease.app.studies import ensure_storage, fail_stale_trials, open_storage

        storage = str(storage)
        ensure_storage(storage)
        # Create the schema here, retrying while a sibling worker creates it, so the sweeper's own open finds it
        # complete (several workers started together on a fresh database otherwise race in Optuna's create_all).
        open_storage(storage)
        study_name = OmegaConf.select(sweeper, "study_name")
        if not study_name:
            return
        if self.stale_after_s is not None:
            failed = fail_stale_trials(storage, study_name, self.stale_after_s)
            if failed:
                log.warning("study %s: marked %d stale RUNNING trial(s) FAIL: %s", study_name, len(failed), failed)
