"""The job's side of an Optuna sweep: report each evaluation to its trial, stop when the pruner says so.

`EaseOptunaSweeper` (ease/app/sweeper.py) hands every job its trial number as `optuna_trial=N`. The job opens
the same study through `hydra.sweeper.storage`, with the pruner `hydra.sweeper.pruner` names, and after every
evaluation (an epoch, or `train.eval_every` steps) reports the first objective's validation value at that
evaluation's number. When `should_prune()` says so it marks the trial (`pruned_at`), writes metrics.json with
`status: pruned` and the last evaluation's metrics, and returns NaN to the sweeper, which records the trial
PRUNED. The job also leaves its run folder and headline metrics as the trial's user attributes, which
optuna-dashboard shows.

Reporting goes through the storage, so it works with every launcher (basic, joblib, submitit) and with several
sweep processes on one database. ASHEM's two phases have different objectives: its jobs record their trial's
attributes but report no intermediate values (never pruned).
"""

import logging
import math
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from ease.app.constraints import Constraint, parse_constraints, record_constraints

log = logging.getLogger("ease")

TRIAL_KEY = "optuna_trial"  # the top-level config key the sweeper sets for each job
PRUNED_ATTR = "pruned_at"  # trial user attribute: the evaluation at which the job stopped

# hydra.sweeper.pruner -> Optuna's class. `none` (or null) does not prune.
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "wilcoxon": optuna.pruners.WilcoxonPruner,
    "threshold": optuna.pruners.ThresholdPruner,
}
HEADLINE = ("ppl", "loss", "acc", "shallow_ratio", "compute_cost")


class TrialPruned(Exception):  # noqa: N818  (Optuna's own name for it)
    """The pruner stopped this job after evaluation `step`; `metrics` is what its record keeps."""

    def __init__(self, step: int, value: float, metrics: dict[str, Any]) -> None:
        super().__init__(f"pruned by the sweep's pruner after evaluation {step} (objective {value:.6g})")
        self.step, self.value, self.metrics = step, value, metrics


def build_pruner(name: str | None, args: dict[str, Any]) -> optuna.pruners.BasePruner:
    """Optuna's pruner for `hydra.sweeper.pruner` / `pruner_args`; one line naming the key otherwise."""
    if name is None or name == "none":
        if args:
            raise ValueError("hydra.sweeper.pruner_args: given, but hydra.sweeper.pruner is none")
        return optuna.pruners.NopPruner()
    if name not in PRUNERS:
        raise ValueError(f"hydra.sweeper.pruner: must be one of none, {', '.join(PRUNERS)}, got {name!r}")
    try:
        return PRUNERS[name](**args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"hydra.sweeper.pruner_args: {PRUNERS[name].__name__}: {err}") from None


def pruner_args(value: Any) -> dict[str, Any]:
    """`hydra.sweeper.pruner_args` as a plain dict (null: none)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"hydra.sweeper.pruner_args: must be a mapping of the pruner's arguments, got {value!r}")
    return value


def check_pruner(name: Any, args: dict[str, Any]) -> None:
    if name is not None and not isinstance(name, str):
        raise ValueError(f"hydra.sweeper.pruner: must be a name (none, {', '.join(PRUNERS)}), got {name!r}")
    build_pruner(name, args)


def objective_value(row: dict[str, Any], name: str) -> float | None:
    """An evaluation row's value of objective `name` (`ppl` is the row's `val_ppl`, `compute_cost` itself)."""
    value = row.get(f"val_{name}", row.get(name))
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class TrialReporter:
    """The job's handle on its trial: intermediate values, the pruning decision, user attributes."""

    def __init__(self, storage: str, study_name: str, number: int, pruner: optuna.pruners.BasePruner, objective: str):
        # RandomSampler: the job samples nothing, and a Trial asks its study's sampler for relative params.
        study = optuna.load_study(
            study_name=study_name, storage=storage, pruner=pruner, sampler=optuna.samplers.RandomSampler()
        )
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        self.trial = optuna.trial.Trial(study, trial_id)
        self.number, self.objective = number, objective
        self.constraints: list[Constraint] = []  # hydra.sweeper.constraints, recorded in the job's metrics
        self.reports = len(study.directions) == 1  # Optuna keeps intermediate values for one objective only

    def start(self, run_dir: str | Path) -> None:
        self.trial.set_user_attr("run_dir", str(run_dir))

    def report(self, step: int, row: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Report evaluation `step`'s objective; raise `TrialPruned` if the pruner stops the trial here."""
        value = objective_value(row, self.objective)
        if not self.reports or value is None:
            return
        self.trial.report(value, step)
        if self.trial.should_prune():
            metrics = {key: row.get(f"val_{key}", row.get(key)) for key in HEADLINE}
            self._set_headline(metrics)  # a sampler's constraints_func reads them for PRUNED trials too
            self.trial.set_user_attr(PRUNED_ATTR, step)
            raise TrialPruned(step, value, {**metrics, "pruned_at": step, "history": history})

    def finish(self, metrics: dict[str, Any]) -> None:
        """The finished job's headline metrics on its trial; with constraints, which held, into `metrics`."""
        self._set_headline(metrics)
        if self.constraints:
            metrics.update(record_constraints(metrics, self.constraints))

    def _set_headline(self, metrics: dict[str, Any]) -> None:
        for key in HEADLINE:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.trial.set_user_attr(key, float(value))


def trial_reporter(cfg: DictConfig) -> TrialReporter | None:
    """The reporter of a job launched by `EaseOptunaSweeper` with a storage, else None."""
    number = OmegaConf.select(cfg, TRIAL_KEY)
    if number is None:
        return None
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().sweeper
    storage, study_name = OmegaConf.select(sweeper, "storage"), OmegaConf.select(sweeper, "study_name")
    if not storage or not study_name:
        return None
    name = OmegaConf.select(sweeper, "pruner")
    pruner = build_pruner(name, pruner_args(OmegaConf.select(sweeper, "pruner_args")))
    reporter = TrialReporter(str(storage), str(study_name), int(number), pruner, str(cfg.objective[0]))
    constraints = OmegaConf.select(sweeper, "constraints")
    reporter.constraints = parse_constraints(
        OmegaConf.to_container(constraints) if OmegaConf.is_config(constraints) else constraints
    )
    if name not in (None, "none") and cfg.strategy.name == "ashem":
        log.warning("hydra.sweeper.pruner: ASHEM's two phases have different objectives; this trial is not pruned")
        reporter.reports = False
    return reporter


_active: TrialReporter | None = None


def active_reporter() -> TrialReporter | None:
    """The reporter of the job running in this process (set by `ease.app.runner.run`), else None."""
    return _active


class reporting:  # noqa: N801  (used as a context manager, like contextlib's)
    """`with reporting(cfg, run_dir):` the job's trial reporter is `active_reporter()` inside (None outside a
    sweep); its run folder is recorded on the trial. One job at a time per process (the basic launcher runs
    its jobs one after another in-process)."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir

    def __enter__(self) -> TrialReporter | None:
        global _active
        from ease import distributed

        reporter = trial_reporter(self.cfg)
        ctx = distributed.current()
        if reporter is not None and ctx.enabled:
            if not ctx.is_main:
                reporter = None
            elif reporter.reports:  # the ranks would have to agree on the decision: a torchrun job is never pruned
                log.warning("hydra.sweeper.pruner: a job under torchrun is not pruned")
                reporter.reports = False
        if reporter is not None:
            reporter.start(self.run_dir)
        _active = reporter
        return reporter

    def __exit__(self, *exc: object) -> None:
        global _active
        _active = None
