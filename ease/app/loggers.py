"""Experiment loggers, the `logger` group: none (default), csv, tensorboard, wandb, mlflow, each through its library.

`build_loggers(cfg, output_dir, rank)` turns the group into a `RunLoggers`, which fans every call out to the
chosen logger (none: no logger, every call a no-op; `metrics.json` is written either way). Everything lands in
the run folder, under `logs/NAME/`: `csv/metrics.csv`, `tensorboard/` event files, `wandb/` (an offline run
unless `logger.mode=online`), `mlflow/mlflow.db` (a SQLite store, unless `logger.tracking_uri` names another).

What the loggers receive: `log_config` the resolved run config (nested), `log_metrics` flat keys such as
`train/loss`, `train/lr`, `train/loss_exit_1`, `train/tokens_per_s`, `val/ppl`, `val/loss` at a training step
(nested dicts are flattened with `/`; None, NaN, infinite and non-numeric values are skipped), and `close` the
run's end: ok | failed | interrupted. A logger that raises is switched off with one warning: logging never
ends a training run. Only rank 0 logs. A missing library is one line naming the install command, raised when
the loggers are built (`check_loggers` raises it earlier, without building anything). See docs/logging.md.
"""

import contextlib
import csv
import importlib
import json
import logging
import math
import os
import posixpath
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from omegaconf import DictConfig, OmegaConf

from ease.extras import require

log = logging.getLogger(__name__)

LOGGERS = ("none", "csv", "tensorboard", "wandb", "mlflow")
LIBRARIES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # logger -> module it needs
WANDB_MODES = ("offline", "online", "disabled")
STATUSES = ("ok", "failed", "interrupted")
_WANDB_BAD_PROJECT = re.compile(r"[/\\#?%:]")
WANDB_INIT_TIMEOUT_S = 60.0  # wandb.init waits this long for its service process, then fails (no hang)


@dataclass
class LoggerConfig:
    """The `logger` group: which experiment logger the run writes to, besides metrics.json.

    Attributes:
        name: none | csv | tensorboard | wandb | mlflow.
        project: wandb's project, mlflow's experiment name.
        run_name: The run's name in wandb and mlflow; None = the run folder's last two parts (DATE/TIME, TIME/N).
        tracking_uri: mlflow: a tracking server (http://...) or store (sqlite:///..., file:...); None = a SQLite
            store in the run folder (logs/mlflow/mlflow.db).
        mode: wandb: offline (default: files only, no network, no login) | online | disabled.
        log_every: Per-step training records (every key under `train/`) are passed on at steps that are multiples
            of it; evaluation and final records always.
    """

    name: str = "none"
    project: str = "ease"
    run_name: str | None = None
    tracking_uri: str | None = None
    mode: str = "offline"
    log_every: int = 1

    def __post_init__(self) -> None:
        for key, allowed in (("name", LOGGERS), ("mode", WANDB_MODES)):
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"logger.{key}: must be one of {', '.join(allowed)}, got {value!r}")
        if not isinstance(self.project, str) or not self.project.strip() or len(self.project) > 128:
            raise ValueError(f"logger.project: must be a non-empty name, at most 128 characters, got {self.project!r}")
        if _WANDB_BAD_PROJECT.search(self.project):
            raise ValueError(f"logger.project: must not contain / \\ # ? % or :, got {self.project!r}")
        if self.run_name is not None and (not isinstance(self.run_name, str) or not self.run_name.strip()):
            raise ValueError(f"logger.run_name: must be a non-empty string or null, got {self.run_name!r}")
        if self.tracking_uri is not None and (not isinstance(self.tracking_uri, str) or not self.tracking_uri.strip()):
            raise ValueError(f"logger.tracking_uri: must be a non-empty URI or null, got {self.tracking_uri!r}")
        if isinstance(self.log_every, bool) or not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"logger.log_every: must be an int >= 1, got {self.log_every!r}")


class ExperimentLogger(Protocol):
    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, status: str) -> None: ...


# --- values ---------------------------------------------------------------------------------------------------


def flatten(tree: Mapping[Any, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """{"val": {"ppl": 3.0}} -> {"val/ppl": 3.0}; keys become strings, leaves are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, sep, name))
        else:
            out[name] = value
    return out


def as_number(value: Any) -> float | None:
    """A finite float, or None for None, NaN, infinities, strings and anything float() refuses."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)  # ints, bools, numpy scalars, 0-d tensors
    except Exception:
        return None
    return number if math.isfinite(number) else None


def scalars(metrics: Mapping[Any, Any]) -> dict[str, float]:
    """The loggable part of a metrics record: flattened with `/`, finite numbers only, the `step` key dropped."""
    out = {}
    for key, value in flatten(metrics).items():
        number = as_number(value)
        if number is not None and key != "step":
            out[key] = number
    return out


def plain_config(config: Any) -> dict[str, Any]:
    """A run config as a plain nested dict (an OmegaConf node is resolved, a dataclass turned into a dict)."""
    if OmegaConf.is_config(config):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    if is_dataclass(config) and not isinstance(config, type):
        return asdict(config)
    return dict(config)


def _run_name(settings: LoggerConfig, output_dir: Path) -> str:
    if settings.run_name:
        return settings.run_name
    path = Path(output_dir).resolve()
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


# --- the loggers ----------------------------------------------------------------------------------------------


class CsvLogger:
    """`metrics.csv`: a header `step,KEY,...` and one row per logged record (its keys filled, the others empty);
    a key first seen later adds a column (the file is rewritten once for it). `config.json` beside it. A resumed
    run (same folder) appends to the same file."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.csv"
        self.config_path = folder / "config.json"
        self.columns = ["step"]
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open(newline="") as f:
                self.columns = next(csv.reader(f), None) or self.columns
            self.file = self.path.open("a", newline="")
        else:
            self.file = self.path.open("w", newline="")
            csv.writer(self.file).writerow(self.columns)
            self.file.flush()

    def log_config(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(json.dumps(config, indent=2, default=str) + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        new = [key for key in metrics if key not in self.columns]
        if new:
            self._add_columns(new)
        row = {"step": step, **metrics}
        csv.DictWriter(self.file, self.columns).writerow(row)
        self.file.flush()

    def _add_columns(self, new: list[str]) -> None:
        self.file.close()
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        self.columns = self.columns + new
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self.file = self.path.open("a", newline="")

    def close(self, status: str) -> None:
        self.file.close()


class TensorBoardLogger:
    """Event files in the folder (`tensorboard --logdir RUN/logs/tensorboard`): one scalar per key, the config as
    a text table (`config`) and in the HPARAMS tab."""

    def __init__(self, folder: Path) -> None:
        require("tensorboard", "logger=tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), flush_secs=10)

    def log_config(self, config: dict[str, Any]) -> None:
        flat = flatten(config, sep=".")
        rows = "\n".join(f"| {key} | {value} |" for key, value in flat.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows, 0)
        try:  # the HPARAMS tab: the same summaries add_hparams writes, but into this run instead of a sub-run
            from torch.utils.tensorboard.summary import hparams

            values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
            file_writer = self.writer._get_file_writer()
            for summary in hparams(values, {"val/ppl": 0.0, "val/loss": 0.0}):
                file_writer.add_summary(summary)
        except Exception as err:  # an older torch without these helpers: the text table is there anyway
            log.debug("tensorboard hparams not written: %s", err)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, status: str) -> None:
        self.writer.add_text("status", status, 0)
        self.writer.flush()
        self.writer.close()


class WandbLogger:
    """A wandb run in `folder` (RUN/logs/wandb/offline-run-*): offline by default (no network, no login; `wandb
    sync` uploads it later). The config is wandb's (nested) config; metrics go to the run's history at their step;
    `close` finishes the run and ends wandb's service process."""

    EXIT_CODES: ClassVar[dict[str, int]] = {"ok": 0, "failed": 1, "interrupted": 130}

    def __init__(self, folder: Path, settings: LoggerConfig, output_dir: Path) -> None:
        self.wandb = require("wandb", "logger=wandb")
        folder.parent.mkdir(parents=True, exist_ok=True)
        wanted = {
            "silent": True,  # no banner lines among the run's own output
            "console": "off",  # leave stdout/stderr (tqdm, Hydra's log) alone
            "x_disable_stats": True,  # no system-metrics sampler
            "save_code": False,
            "disable_git": True,
            "init_timeout": WANDB_INIT_TIMEOUT_S,
        }
        known = getattr(self.wandb.Settings, "model_fields", wanted)  # pydantic Settings refuse unknown keys
        self.run = self.wandb.init(
            project=settings.project,
            name=_run_name(settings, output_dir),
            dir=str(folder.parent),  # wandb adds wandb/ itself: RUN/logs/wandb/offline-run-*
            mode=settings.mode,
            settings=self.wandb.Settings(**{k: v for k, v in wanted.items() if k in known}),
        )

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str) -> None:
        try:
            self.run.summary["status"] = status
            self.run.finish(exit_code=self.EXIT_CODES.get(status, 1))
        finally:
            self.wandb.teardown()  # ends wandb's service process, so nothing outlives the run


class MlflowLogger:
    """An mlflow run through `MlflowClient` (no global active run, so in-process sweeps do not interfere): the
    config flattened with `.` as params (values cut to mlflow's length limit), metrics with their step, and the
    run's end as FINISHED / FAILED / KILLED. Default store: SQLite in the run folder; `mlflow ui
    --backend-store-uri sqlite:///RUN/logs/mlflow/mlflow.db` shows it."""

    STATUS: ClassVar[dict[str, str]] = {"ok": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
    FLUSH_S = 5.0  # per-step metrics are written at least this often...
    FLUSH_METRICS = 1000  # ...or once this many values wait

    def __init__(self, folder: Path, settings: LoggerConfig, output_dir: Path) -> None:
        uri = settings.tracking_uri
        file_store = uri is not None and (
            uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks"))
        )
        if uri is None or file_store or uri.startswith("sqlite:"):
            # a local store: nothing is sent anywhere, mlflow's usage telemetry included (unless the user set it)
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if file_store:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses file stores without it
        mlflow = require("mlflow", "logger=mlflow")
        from mlflow.tracking import MlflowClient

        self.mlflow = mlflow
        artifacts = None
        if uri is None:
            folder.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{(folder / 'mlflow.db').resolve()}"
            artifacts = (folder / "artifacts").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self._experiment(settings.project, artifacts)
        tags = {"ease.output_dir": str(Path(output_dir).resolve())}
        run = self.client.create_run(experiment, run_name=_run_name(settings, output_dir), tags=tags)
        self.run_id = run.info.run_id
        self.params: dict[str, str] = {}
        self.pending: list[Any] = []  # metrics not yet written (see log_metrics)
        self.flushed = time.monotonic()
        validation = importlib.import_module("mlflow.utils.validation")
        self.max_value = getattr(validation, "MAX_PARAM_VAL_LENGTH", 500)
        self.max_key = getattr(validation, "MAX_ENTITY_KEY_LENGTH", 250)

    def _experiment(self, name: str, artifacts: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except self.mlflow.exceptions.MlflowException:  # another job of a sweep made it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _key(self, key: str) -> str:
        """A name mlflow accepts: alphanumerics, _ - . / : and spaces, no empty or relative path parts."""
        key = re.sub(r"[^\w\-. /:]", "_", key)
        key = posixpath.normpath(key).lstrip("/")
        return key[: self.max_key] if key not in ("", ".") and not key.startswith("..") else "_" + key

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = []
        for key, value in flatten(config, sep=".").items():
            key, text = self._key(key), str(value)[: self.max_value]
            if key not in self.params:  # params cannot change once logged
                self.params[key] = text
                params.append(Param(key, text))
        for chunk in _chunks(params, 100):  # mlflow's per-batch limit for params
            self.client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffered: one write to the store costs about 9 ms on SQLite, more than a small model's step; per-step
        records wait up to FLUSH_S seconds (or FLUSH_METRICS values), any other record is written at once."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(self._key(key), value, now, step) for key, value in metrics.items()]
        per_step = all(key.startswith("train/") for key in metrics)
        if not per_step or len(self.pending) >= self.FLUSH_METRICS or time.monotonic() - self.flushed >= self.FLUSH_S:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for chunk in _chunks(pending, 1000):  # mlflow's per-batch limit for metrics
            self.client.log_batch(self.run_id, metrics=chunk)
        self.flushed = time.monotonic()

    def close(self, status: str) -> None:
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=self.STATUS.get(status, "FAILED"))


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- the fan-out and the builder ------------------------------------------------------------------------------


class RunLoggers:
    """Fans each call out to the run's loggers; empty (falsy, every call a no-op) for logger=none or rank != 0.

    A logger whose call raises is switched off for the rest of the run with one warning: a logging failure never
    ends training. `close` is safe to call more than once. As a context manager, it closes with ok, failed or
    interrupted (KeyboardInterrupt) by how the block ended.
    """

    def __init__(self, loggers: Sequence[ExperimentLogger] = (), log_every: int = 1) -> None:
        self.loggers = list(loggers)
        self.log_every = log_every
        self.closed = False

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def __len__(self) -> int:
        return len(self.loggers)

    def log_config(self, config: Any) -> None:
        if self.loggers:
            self._each("log_config", plain_config(config))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if not self.loggers:
            return
        values = scalars(metrics)
        if not values:
            return
        if step % self.log_every and all(key.startswith("train/") for key in values):
            return
        self._each("log_metrics", values, int(step))

    def close(self, status: str = "ok") -> None:
        if self.closed:
            return
        self.closed = True
        self._each("close", status if status in STATUSES else "failed")
        self.loggers = []

    def _each(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as err:
                self.loggers.remove(logger)
                log.warning(
                    "%s failed in %s and is off for the rest of this run: %s: %s",
                    type(logger).__name__, method, type(err).__name__, err,
                )  # fmt: skip
                if method != "close":
                    with contextlib.suppress(Exception):
                        logger.close("failed")

    def __enter__(self) -> "RunLoggers":
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if kind is None:
            self.close("ok")
        else:
            self.close("interrupted" if issubclass(kind, KeyboardInterrupt) else "failed")


def logger_config(cfg: Any) -> LoggerConfig:
    """The `logger` group of a run config (or the group itself, or a LoggerConfig), validated; a config without
    one (an older checkpoint's) gives the default, logger=none."""
    if isinstance(cfg, LoggerConfig):
        return cfg
    names = [f.name for f in fields(LoggerConfig)]
    if "logger" in cfg:
        node = cfg["logger"]
    elif all(str(key) in names for key in cfg):  # the group itself
        node = cfg
    else:  # a run config without the group (an older checkpoint's)
        return LoggerConfig()
    if node is None:
        return LoggerConfig()
    if OmegaConf.is_config(node) and OmegaConf.get_type(node) is LoggerConfig:
        return OmegaConf.to_object(node)  # type: ignore[return-value]
    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    for key in plain:
        if key not in names:
            raise ValueError(f"logger.{key}: not a config key; the keys of logger are {', '.join(names)}")
    return LoggerConfig(**plain)


def check_loggers(cfg: Any) -> LoggerConfig:
    """The group's checks and the chosen logger's library, without building anything (call it before training)."""
    settings = logger_config(cfg)
    module = LIBRARIES.get(settings.name)
    if module is not None:
        require(module, f"logger={settings.name}")
    return settings


def build_loggers(cfg: DictConfig | LoggerConfig, output_dir: Path, rank: int = 0) -> RunLoggers:
    """The run's loggers, writing under `output_dir/logs/NAME/`; none for logger=none or on a rank other than 0.

    Raises:
        ValueError: a bad `logger.*` value (one line naming the key).
        ImportError: the chosen logger's library is not installed (one line with the install command).
    """
    settings = check_loggers(cfg)
    if rank != 0 or settings.name == "none":
        return RunLoggers([], settings.log_every)
    output_dir = Path(output_dir)
    folder = output_dir / "logs" / settings.name
    logger: ExperimentLogger
    if settings.name == "csv":
        logger = CsvLogger(folder)
    elif settings.name == "tensorboard":
        logger = TensorBoardLogger(folder)
    elif settings.name == "wandb":
        logger = WandbLogger(folder, settings, output_dir)
    else:
        logger = MlflowLogger(folder, settings, output_dir)
    return RunLoggers([logger], settings.log_every)
