"""Optuna study chores the sweeper leaves undone: the SQLite folder, stale RUNNING trials, resume-aware seeds.

hydra-optuna-sweeper opens `hydra.sweeper.storage` with `optuna.create_study(..., load_if_exists=True)`, so the
same `-m` command resumes the same study. It does not create the folder of a SQLite file; a controller killed
mid-batch leaves its trials RUNNING for ever (the sweeper uses ask/tell, so Optuna's heartbeat never runs); and a
fixed sampler seed makes a resumed sweep replay the first sweep's start-up points. The callback in
`ease.app.callbacks` calls the first two before the sweeper starts; `${ease_resume_seed:0}` handles the third.
"""

import logging
import time
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger("ease")

STALE_REASON = "left RUNNING by a sweep that was killed; marked FAIL when the next sweep started"


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URL (absolute with four slashes), else None."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url[len(prefix) :] in ("", ":memory:"):
        return None
    return Path(url[len(prefix) :])


def ensure_storage(url: str) -> None:
    """Create the folder of a SQLite database so the sweeper can open it (other URLs need nothing)."""
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def _storage(url: str) -> optuna.storages.BaseStorage:
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as err:  # drivers raise many kinds; the user needs the URL and the reason on one line
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ValueError(f"hydra.sweeper.storage: cannot open {url}: {reason}") from err


def study_trials(url: str, study_name: str) -> list[FrozenTrial]:
    """Every trial of a stored study ([] if the study does not exist yet)."""
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        return []
    storage = _storage(url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return []
    return storage.get_all_trials(study_id, deepcopy=False)


def fail_stale_trials(url: str, study_name: str, older_than_s: float = 0.0) -> list[int]:
    """Mark FAIL the study's RUNNING trials that started more than `older_than_s` seconds ago.

    With one sweep process per study (the default SQLite set-up) every RUNNING trial found at start is stale.
    When several processes share a study (a PostgreSQL URL), pass a grace period longer than the longest
    trial, or a live trial of another process would be failed under it.

    Returns:
        The numbers of the trials marked FAIL.
    """
    if older_than_s < 0:
        raise ValueError(f"stale_after_s: must be >= 0, got {older_than_s}")
    storage = _storage(url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return []
    now = time.time()
    failed = []
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        if now - started < older_than_s:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", STALE_REASON)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:  # another process finished it meanwhile: not stale after all
            continue
        failed.append(trial.number)
    return failed


def resume_seed(base: int, url: str | None, study_name: str | None) -> int:
    """The sampler seed for a sweep: `base` plus the number of trials already in the study.

    With a fixed seed, a resumed sweep would replay the first sweep's random start-up points (the sampler's
    RNG restarts); offsetting by the study's size avoids that and stays reproducible from the study's state.
    """
    if not url or not study_name:
        return base
    return base + len(study_trials(url, study_name))


def _resume_seed_resolver(base: int, *, _root_: DictConfig) -> int:
    sweeper = _root_.hydra.sweeper
    return resume_seed(int(base), OmegaConf.select(sweeper, "storage"), OmegaConf.select(sweeper, "study_name"))


def register_resolvers() -> None:
    """`${ease_resume_seed:BASE}`: BASE + the trials already in `hydra.sweeper.study_name` (the sampler seed)."""
    OmegaConf.register_resolver("ease_resume_seed", _resume_seed_resolver, replace=True)
