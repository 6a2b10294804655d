"""The Optuna sweeper EASE runs: hydra-optuna-sweeper's, plus what it cannot do itself.

hydra-optuna-sweeper asks Optuna for trials, launches one job per trial and tells Optuna the values the jobs
return. It cannot prune (the job never sees its trial: hydra #1954), it exits 1 when a grid sweep has a
failing trial (the grid sampler's `Study.stop` raises outside an objective), when no trial completed (its
`study.best_trial`) and on `n_trials=0` (`Record does not exist`). `EaseOptunaSweeper` is a thin subclass:

- every job gets its trial's number (`optuna_trial=N`, a top-level config key) next to the sampled params;
  the job (`ease.app.pruning`) reports each evaluation's objective to that trial through the study's storage
  and stops when `hydra.sweeper.pruner` says so. It marks the trial with the user attribute `pruned_at` and
  returns NaN; the sweeper's study then records the trial PRUNED (with its last reported value), not FAIL;
- a sweep whose every job ran exits 0, whatever its trials' states, and prints one line:
  `sweep: N trials: C complete, F failed, P pruned (study NAME)`;
- bad sweep settings are one line naming the key, before any trial is asked.

Everything else (the sampler, the search space, ask/tell batches, the launchers) is the plugin's own code.
Hydra finds the class through the `hydra.plugins` entry point in pyproject.toml; `conf/hydra/sweeper/ease_optuna.yaml`
configures it (`ease_optuna_plugin`, registered below, is its schema: the plugin's plus `pruner` and `pruner_args`).
"""

import logging
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

import optuna
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper import _impl
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from ease.app.constraints import TrialConstraints, parse_constraints
from ease.app.pruning import PRUNED_ATTR, TRIAL_KEY, check_pruner
from ease.app.pruning import pruner_args as pruner_args_dict

log = logging.getLogger("ease")
_ABSENT = object()


class PruningAwareStudy(optuna.Study):
    """A study whose `tell` records a trial its job pruned as PRUNED, and survives the grid sampler's stop.

    The plugin tells every job's return: a pruned job returns NaN, which would be a FAIL. The job has marked
    its trial (`pruned_at`), so here the trial is told PRUNED instead (Optuna then keeps its last reported
    value). The grid sampler calls `study.stop()` from `after_trial` once the grid is exhausted, which raises
    outside an objective; the trial's state is already stored by then (Optuna stores it in a `finally`).
    """

    def tell(  # type: ignore[override]
        self,
        trial: optuna.trial.Trial | int,
        values: float | Sequence[float] | None = None,
        state: TrialState | None = None,
        skip_if_finished: bool = False,
    ) -> optuna.trial.FrozenTrial:
        number = trial if isinstance(trial, int) else trial.number
        trial_id = self._storage.get_trial_id_from_study_id_trial_number(self._study_id, number)
        frozen = self._storage.get_trial(trial_id)
        if frozen.state == TrialState.RUNNING and PRUNED_ATTR in frozen.user_attrs:
            values, state = None, TrialState.PRUNED
        try:
            return super().tell(trial, values, state, skip_if_finished)
        except RuntimeError as err:
            if "Study.stop" not in str(err):
                raise
            return self._storage.get_trial(trial_id)  # the grid is exhausted; this trial is recorded


class EaseSweeperImpl(_impl.OptunaSweeperImpl):
    """The plugin's implementation with the trial handed to each job and a pruning-aware study."""

    pruner: str | None = None
    asked: list[int]

    def _configure_trials(
        self,
        trials: list[optuna.trial.Trial],
        search_space_distributions: dict[str, Any],
        fixed_params: dict[str, Any],
        fixed_overrides: list[str],
    ) -> Sequence[Sequence[str]]:
        overrides = super()._configure_trials(trials, search_space_distributions, fixed_params, fixed_overrides)
        self.asked.extend(t.number for t in trials)
        return [(*job, f"{TRIAL_KEY}={t.number}") for job, t in zip(overrides, trials, strict=True)]

    def sweep(self, arguments: list[str]) -> None:
        self.asked = []
        check_sweep_settings(self.n_trials, self.pruner, self._get_directions(), self.storage)
        self._check_search_space(arguments)
        try:
            with _pruning_aware_studies():
                super().sweep(arguments)
        except ValueError as err:
            # The plugin's `study.best_trial` at the end, when no trial of the study completed (Optuna says "Record
            # does not exist." or "No trials are completed yet."): every job ran, so the sweep did what it was
            # asked, and the summary says how its trials ended.
            if not self._all_asked_finished() or not re.search(
                r"Record does not exist|No trials are completed|No feasible trials", str(err)
            ):
                raise
            log.warning("no trial of study %s completed: no best parameters to report", self.study_name)
        print(self.summary())

    def _check_search_space(self, arguments: list[str]) -> None:
        """Each searched parameter parses to a valid distribution and names a config key, checked before any trial
        is asked: the plugin would raise Optuna's message without the key (`interval(0.9, 0.1)`), or leave the
        asked trials RUNNING when the launcher cannot compose a job (a key that does not exist)."""
        self._process_searchspace_config()
        for override in [*self._parse_sweeper_params_config(), *arguments]:
            key = override.split("=", 1)[0]
            try:
                distributions, _, _ = _impl.create_params_from_overrides([override])
            except Exception as err:  # Optuna's and Hydra's parsers raise several kinds
                raise ValueError(f"{key}: not a valid search space ({override}): {str(err).splitlines()[0]}") from None
            name = key.lstrip("+~")
            if (
                distributions
                and not key.startswith("+")
                and OmegaConf.select(self.config, name, default=_ABSENT) is _ABSENT
            ):
                raise ValueError(
                    f"{name}: not a config key, cannot be searched (hydra.sweeper.params or the command line)"
                )

    def _trials(self) -> list[optuna.trial.FrozenTrial]:
        """The trials this sweep asked for."""
        if not self.asked:
            return []
        study = optuna.load_study(study_name=self.study_name, storage=self.storage)
        return [t for t in study.get_trials(deepcopy=False) if t.number in self.asked]

    def _all_asked_finished(self) -> bool:
        trials = self._trials()
        return len(trials) == self.n_trials and all(t.state.is_finished() for t in trials)

    def summary(self) -> str:
        """`sweep: N trials: C complete, F failed, P pruned (study NAME)` over the trials this sweep asked."""
        states = {TrialState.COMPLETE: 0, TrialState.FAIL: 0, TrialState.PRUNED: 0}
        for t in self._trials():
            if t.state in states:
                states[t.state] += 1
        return (
            f"sweep: {len(self.asked)} trials: {states[TrialState.COMPLETE]} complete, {states[TrialState.FAIL]} "
            f"failed, {states[TrialState.PRUNED]} pruned (study {self.study_name})"
        )


@contextmanager
def _pruning_aware_studies():
    """`optuna.create_study` as the plugin calls it, returning a `PruningAwareStudy` of the same study."""
    create = optuna.create_study

    def create_study(*args: Any, **kwargs: Any) -> optuna.Study:
        study = create(*args, **kwargs)
        return PruningAwareStudy(study.study_name, study._storage, study.sampler, study.pruner)

    with mock.patch.object(_impl.optuna, "create_study", create_study):
        yield


def check_sweep_settings(n_trials: Any, pruner: str | None, directions: list[str], storage: Any) -> None:
    """One line naming the key for sweep settings the plugin would fail on late or obscurely (the pruner's own
    name and arguments are checked when the sweeper is built)."""
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"hydra.sweeper.n_trials: must be an int >= 1 (trials to add to the study), got {n_trials!r}")
    if pruner not in (None, "none"):
        if len(directions) > 1:
            raise ValueError(
                f"hydra.sweeper.pruner: Optuna prunes single-objective studies only; this sweep has {len(directions)} "
                "objectives (use hydra.sweeper.pruner=none)"
            )
        if not storage:
            raise ValueError("hydra.sweeper.pruner: pruning needs hydra.sweeper.storage (jobs report through it)")


class EaseOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's `OptunaSweeper` with EASE's implementation (see the module's docstring).

    `pruner` and `pruner_args` are read by the jobs (`ease.app.pruning`); the sweeper checks them up front.
    """

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: Any | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        custom_search_space: str | None,
        params: DictConfig | None,
        pruner: str | None = None,
        pruner_args: dict[str, Any] | None = None,
        constraints: Any = None,
    ) -> None:
        check_pruner(pruner, pruner_args_dict(pruner_args))
        parsed = parse_constraints(
            OmegaConf.to_container(constraints) if OmegaConf.is_config(constraints) else constraints
        )
        super().__init__(
            sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate, custom_search_space, params
        )
        plugin = self.sweeper
        if parsed:  # the same sampler, built again with Optuna's constraints_func
            target = str(OmegaConf.select(sampler, "_target_", default=""))
            if target.rsplit(".", 1)[-1] not in ("TPESampler", "NSGAIISampler", "GPSampler"):
                raise ValueError(
                    f"hydra.sweeper.constraints: the TPE, NSGA-II and GP samplers take constraints, not {target}"
                )
            plugin.sampler = instantiate(
                sampler, constraints_func=TrialConstraints(parsed), _execution_whitelist_=("optuna.samplers.*",)
            )
        self.sweeper = EaseSweeperImpl(
            plugin.sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate, None, params
        )
        self.sweeper.custom_search_space_extender = plugin.custom_search_space_extender
        self.sweeper.pruner = pruner


@dataclass
class EaseOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "ease.app.sweeper.EaseOptunaSweeper"
    # An Optuna pruner by name (ease.app.pruning.PRUNERS: median, percentile, successive_halving, hyperband,
    # wilcoxon, threshold; none or null for no pruning) and its keyword arguments.
    pruner: str | None = None
    pruner_args: Any = None  # a dict; Any, so that a whole dict can be given on the command line
    # ["compute_cost <= 0.7", ...]: minimise among the trials that satisfy them (ease.app.constraints)
    constraints: Any = None


ConfigStore.instance().store(group="hydra/sweeper", name="ease_optuna_plugin", node=EaseOptunaSweeperConf)
