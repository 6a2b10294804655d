"""Optuna study chores the sweeper leaves undone: the SQLite folder, stale RUNNING trials, resume-aware seeds.

hydra-optuna-sweeper opens `hydra.sweeper.storage` with `optuna.create_study(..., load_if_exists=True)`, so the
same `-m` command resumes the same study. It does not create the folder of a SQLite file; a controller killed
mid-batch leaves its trials RUNNING for ever (the sweeper uses ask/tell, so Optuna's heartbeat never runs); and a
fixed sampler seed makes a resumed sweep replay the first sweep's start-up points. The callback in
`ease.app.callbacks` calls the first two before the sweeper starts; `${ease_resume_seed:0}` handles the third.

A bad `hydra.sweeper.storage` (malformed, a SQLite folder that cannot be made or written, a database that cannot
be opened) or a `hydra.sweeper.study_name` that is not a plain name fails in one line that names the key and the
URL, its password hidden, before the sweeper creates a database.
"""

import logging
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import NoReturn

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


def safe_url(url: str) -> str:
    """The URL as messages show it: any password replaced by `***`."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: hide whatever sits between `user:` and `@`
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


_refusals: list[str] = []


def _refuse(message: str) -> NoReturn:
    """Raise `message`; remember it for `last_refusal` (Hydra only warns of an error raised in a callback)."""
    _refusals.append(message)
    raise ValueError(message)


def last_refusal() -> str | None:
    """The last storage or study-name error raised here: `ease.app.errors` reports it in place of the
    driver's error when the sweeper then fails opening the same storage (a sampler without the seed resolver)."""
    return _refusals[-1] if _refusals else None


def _reason(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def check_study_name(study_name: str | None) -> None:
    """The study name becomes the SQLite file name (`${hydra.sweeper.study_name}.db`): a plain name only."""
    from ease.app.schema import check_plain_name

    if study_name is not None:
        try:
            check_plain_name("hydra.sweeper.study_name", study_name)
        except ValueError as err:
            _refuse(str(err))


def _hydra_study_name() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    name = OmegaConf.select(HydraConfig.get(), "sweeper.study_name")
    return None if name is None else str(name)


def ensure_storage(url: str, study_name: str | None = None) -> None:
    """Check the URL and create the folder of a SQLite database so the sweeper can open it.

    Refuses, in one line naming `hydra.sweeper.storage`, a URL SQLAlchemy cannot parse and a SQLite database whose
    folder cannot be created or written; and a study name that is not a plain name (`study_name`, by default the
    running Hydra sweep's), before any folder is made.
    """
    check_study_name(study_name if study_name is not None else _hydra_study_name())
    from sqlalchemy.engine import make_url

    shown = safe_url(url)
    try:
        make_url(url)
    except Exception as err:
        _refuse(f"hydra.sweeper.storage: not a database URL: {shown!r} ({_reason(err)}); e.g. sqlite:////ABS/PATH.db")
    path = sqlite_path(url)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _refuse(f"hydra.sweeper.storage: cannot open {shown}: cannot create {err.filename or path.parent}: "
                f"{err.strerror or _reason(err)}")  # fmt: skip
    writable = os.access(path, os.W_OK) if path.exists() else os.access(path.parent, os.W_OK | os.X_OK)
    if not writable:
        _refuse(f"hydra.sweeper.storage: cannot open {shown}: {path if path.exists() else path.parent} is not writable")


# What a database says when another process is creating Optuna's schema at the same moment (SQLite, PostgreSQL,
# MySQL): the tables, their types or the alembic version row appear between our check and our CREATE/INSERT.
_SCHEMA_RACE = re.compile(
    r"already exists|UNIQUE constraint failed|duplicate key|UniqueViolation|DuplicateTable|Duplicate entry"
    r"|database is locked",
    re.IGNORECASE,
)
SCHEMA_RETRIES = 8


def open_storage(url: str, retries: int = SCHEMA_RETRIES) -> optuna.storages.RDBStorage:
    """`RDBStorage(url)`, retried while another process is creating the same database's schema.

    Several sweep workers started together on a fresh database all run Optuna's `create_all` and version insert;
    all but one can fail on a table, type or row the winner made a moment before. Each retry waits a little longer
    (with jitter, so the losers do not collide again); once the schema is complete, opening it creates nothing.
    Any other error, or a race that outlasts the retries, is one line naming `hydra.sweeper.storage`.
    """
    for attempt in range(retries + 1):
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as err:  # drivers raise many kinds; the user needs the URL and the reason on one line
            if attempt < retries and _SCHEMA_RACE.search(str(err)):
                time.sleep(0.05 * 2**attempt * (1.0 + random.random()))
                continue
            _refuse(f"hydra.sweeper.storage: cannot open {safe_url(url)}: {_reason(err)}")
    raise AssertionError("unreachable")


def study_trials(url: str, study_name: str) -> list[FrozenTrial]:
    """Every trial of a stored study ([] if the study does not exist yet)."""
    check_study_name(study_name)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        return []
    storage = open_storage(url)
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
    check_study_name(study_name)
    storage = open_storage(url)
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
    url, study_name = OmegaConf.select(sweeper, "storage"), OmegaConf.select(sweeper, "study_name")
    if url:  # the sweeper resolves the seed before it opens the study: a bad storage or name stops it here
        ensure_storage(str(url), None if study_name is None else str(study_name))
    return resume_seed(int(base), url, study_name)


def register_resolvers() -> None:
    """`${ease_resume_seed:BASE}`: BASE + the trials already in `hydra.sweeper.study_name` (the sampler seed)."""
    OmegaConf.register_resolver("ease_resume_seed", _resume_seed_resolver, replace=True)
    # Hydra turns an error raised in a callback into a two-line warning and goes on. OptunaStudyCallback's storage
    # and study-name errors are raised again as the one error line: by the sampler's seed resolver above, or when
    # the sweeper fails opening the storage (`last_refusal`).
    warnings.filterwarnings(
        "ignore",
        message=r"Callback OptunaStudyCallback\.on_multirun_start raised ValueError: "
        r"hydra\.sweeper\.(storage|study_name): ",
        category=UserWarning,
    )
