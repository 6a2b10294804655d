"""The `logger` group: each logger writes its own library's files in the run folder, read back with that library."""

import csv
import importlib
import json
import logging
import math
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST, REPO, compose

from ease.app import loggers as L
from ease.app.errors import one_line_error
from ease.app.loggers import LoggerConfig, RunLoggers, build_loggers, check_loggers, scalars

CONFIG = {"model": {"dim": 16, "num_layers": 3}, "train": {"lr": 0.001}, "objective": ["ppl"], "checkpoint": None}
STEPS = {1: 2.0, 2: 1.5, 3: 1.25}  # step -> train/loss


def log_a_run(loggers: RunLoggers, status: str = "ok") -> None:
    """What the training loop sends: the config, per-step records (with the trainer's own `step` key, a None
    throughput and a NaN exit loss, both skipped), one evaluation with a nested per-exit dict, then close."""
    loggers.log_config(CONFIG)
    for step, loss in STEPS.items():
        record = {"step": step, "train/loss": loss, "train/lr": 1e-3 * step, "train/loss_exit_1": loss + 1}
        loggers.log_metrics({**record, "train/tokens_per_s": None if step == 1 else 100.0 * step}, step)
    loggers.log_metrics({"val/ppl": 3.5, "val/loss": 1.25, "val/per_exit": {1: {"ppl": 4.0}}, "bad": math.nan}, 3)
    loggers.close(status)


def child_processes() -> list[str]:
    """The command lines of this process's live children (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == os.getpid():
            out.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return out


# --- the group and its values ---------------------------------------------------------------------------------


def test_default_is_none_and_builds_nothing(tmp_path: Path) -> None:
    cfg = compose()
    assert cfg.logger.name == "none"
    loggers = build_loggers(cfg, tmp_path)
    assert not loggers and len(loggers) == 0
    log_a_run(loggers)  # every call a no-op
    assert not (tmp_path / "logs").exists()


def test_rank_other_than_zero_logs_nothing(tmp_path: Path) -> None:
    loggers = build_loggers(compose(["logger=csv"]), tmp_path, rank=1)
    assert not loggers
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("logger.name=tb", "logger.name: must be one of none, csv, tensorboard, wandb, mlflow, got 'tb'"),
        ("logger.mode=live", "logger.mode: must be one of offline, online, disabled, got 'live'"),
        ("logger.log_every=0", "logger.log_every: must be an int >= 1, got 0"),
        ("logger.project=team/ease", "logger.project: must not contain / \\ # ? % or :, got 'team/ease'"),
        ("logger.project=''", "logger.project: must be a non-empty name, at most 128 characters, got ''"),
        ("logger.run_name=''", "logger.run_name: must be a non-empty string or null, got ''"),
        ("logger.tracking_uri=''", "logger.tracking_uri: must be a non-empty URI or null, got ''"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(override: str, message: str, tmp_path: Path) -> None:
    cfg = compose(["logger=csv", override])
    with pytest.raises(ValueError) as err:
        build_loggers(cfg, tmp_path)
    assert str(err.value) == message
    assert one_line_error(err.value) == message
    assert not (tmp_path / "logs").exists()


def test_a_plain_group_is_checked_too() -> None:
    with pytest.raises(ValueError, match=r"^logger\.nmae: not a config key; the keys of logger are name, "):
        L.logger_config({"logger": {"nmae": "csv"}})
    assert L.logger_config({"model": {}}) == LoggerConfig()  # an older checkpoint's config: no logger
    assert L.logger_config({"name": "csv", "log_every": 5}) == LoggerConfig(name="csv", log_every=5)


def test_every_option_has_a_header_with_its_command() -> None:
    for path in sorted((REPO / "conf" / "logger").glob("*.yaml")):
        text = path.read_text()
        header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
        assert f"logger={path.stem}" in header, path.name
        assert f"name: {path.stem}" in text, path.name
    assert {p.stem for p in (REPO / "conf" / "logger").glob("*.yaml")} == set(L.LOGGERS)


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_missing_library_is_one_line_with_the_install_command(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.import_module

    def without(module: str, *args: Any) -> Any:
        if module.split(".")[0] == name:
            raise ModuleNotFoundError(f"No module named {module!r}")
        return real(module, *args)

    monkeypatch.setattr(importlib, "import_module", without)
    message = f"logger={name} needs {name}: pip install -e '.[loggers]'"
    with pytest.raises(ImportError) as err:
        check_loggers(compose([f"logger={name}"]))
    assert str(err.value) == message
    with pytest.raises(ImportError) as err:
        build_loggers(compose([f"logger={name}"]), tmp_path)
    assert str(err.value) == message
    assert one_line_error(err.value) == f"ImportError: {message}"
    assert not (tmp_path / "logs").exists()


def test_require_takes_an_explicit_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from ease.extras import require

    assert require("json", "x") is json
    sys = __import__("sys")
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)  # imported by earlier tests: make the import run again
    monkeypatch.setitem(sys.modules, "transformers", None)  # None in sys.modules: the import fails
    with pytest.raises(ImportError, match=r"^model=hf needs transformers: pip install -e '\.\[hf\]'$"):
        require("transformers.masking_utils", "model=hf")
    with pytest.raises(ImportError, match=r"^feature needs no_such_pkg: pip install -e '\.\[extra\]'$"):
        require("no_such_pkg.sub", "feature", extra="extra")


# --- the fan-out ----------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def log_config(self, config: dict) -> None:
        self.calls.append(("config", config))

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.calls.append(("metrics", metrics, step))

    def close(self, status: str) -> None:
        self.calls.append(("close", status))


class Broken(Recorder):
    def log_metrics(self, metrics: dict, step: int) -> None:
        raise OSError("disk full")


def test_scalars_flatten_and_skip_what_is_not_a_finite_number() -> None:
    torch = pytest.importorskip("torch")
    record = {"step": 4, "a": 1, "b": None, "c": math.inf, "d": "s", "e": {"1": {"ppl": 2.5}}, "t": torch.tensor(0.5)}
    assert scalars(record) == {"a": 1.0, "e/1/ppl": 2.5, "t": 0.5}


def test_a_failing_logger_is_switched_off_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    good, bad = Recorder(), Broken()
    loggers = RunLoggers([bad, good])
    with caplog.at_level(logging.WARNING, logger="ease.app.loggers"):
        log_a_run(loggers)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["Broken failed in log_metrics and is off for the rest of this run: OSError: disk full"]
    assert bad.calls == [("config", CONFIG), ("close", "failed")]
    assert [c[0] for c in good.calls] == ["config", "metrics", "metrics", "metrics", "metrics", "close"]
    assert good.calls[1] == ("metrics", {"train/loss": 2.0, "train/lr": 0.001, "train/loss_exit_1": 3.0}, 1)
    assert good.calls[4] == ("metrics", {"val/ppl": 3.5, "val/loss": 1.25, "val/per_exit/1/ppl": 4.0}, 3)
    loggers.close("ok")  # a second close does nothing
    assert good.calls[-1] == ("close", "ok") and len(good.calls) == 6


def test_log_every_thins_per_step_records_only() -> None:
    rec = Recorder()
    loggers = RunLoggers([rec], log_every=2)
    for step in range(1, 6):
        loggers.log_metrics({"train/loss": 1.0}, step)
    loggers.log_metrics({"val/ppl": 2.0, "train/epoch_loss": 1.0}, 5)  # an evaluation: always
    assert [c[2] for c in rec.calls] == [2, 4, 5]


ENDINGS = [(None, "ok"), (RuntimeError, "failed"), (KeyboardInterrupt, "interrupted")]


@pytest.mark.parametrize(("error", "status"), ENDINGS)
def test_context_manager_closes_with_the_status(error: type[BaseException] | None, status: str) -> None:
    rec = Recorder()
    try:
        with RunLoggers([rec]):
            if error is not None:
                raise error
    except BaseException:
        pass
    assert rec.calls == [("close", status)]


def test_config_objects_are_made_plain() -> None:
    rec = Recorder()
    RunLoggers([rec]).log_config(compose(["logger=csv"]))
    config = rec.calls[0][1]
    assert type(config) is dict and config["logger"]["name"] == "csv" and config["model"]["num_layers"] == 3


# --- each library ---------------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_csv_writes_a_row_per_record_and_the_config(tmp_path: Path) -> None:
    log_a_run(build_loggers(compose(["logger=csv"]), tmp_path))
    folder = tmp_path / "logs" / "csv"
    rows = read_csv(folder / "metrics.csv")
    header = next(csv.reader((folder / "metrics.csv").open()))
    assert header == [
        "step", "train/loss", "train/lr", "train/loss_exit_1", "train/tokens_per_s",
        "val/ppl", "val/loss", "val/per_exit/1/ppl",
    ]  # fmt: skip
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 3]
    assert [float(r["train/loss"]) for r in rows[:3]] == list(STEPS.values())
    assert rows[0]["train/tokens_per_s"] == "" and float(rows[1]["train/tokens_per_s"]) == 200.0
    assert rows[3]["train/loss"] == "" and float(rows[3]["val/ppl"]) == 3.5
    assert float(rows[3]["val/per_exit/1/ppl"]) == 4.0
    assert json.loads((folder / "config.json").read_text()) == CONFIG


def test_csv_continues_the_file_of_a_resumed_run(tmp_path: Path) -> None:
    first = build_loggers(LoggerConfig(name="csv"), tmp_path)
    first.log_metrics({"train/loss": 2.0}, 1)
    first.close("interrupted")
    again = build_loggers(LoggerConfig(name="csv"), tmp_path)
    again.log_metrics({"train/loss": 1.0}, 2)
    again.log_metrics({"val/ppl": 3.0}, 2)
    again.close("ok")
    rows = read_csv(tmp_path / "logs" / "csv" / "metrics.csv")
    assert [(r["step"], r["train/loss"], r["val/ppl"]) for r in rows] == [
        ("1", "2.0", ""), ("2", "1.0", ""), ("2", "", "3.0"),
    ]  # fmt: skip


def test_tensorboard_event_files_hold_the_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_a_run(build_loggers(compose(["logger=tensorboard"]), tmp_path))
    folder = tmp_path / "logs" / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/loss_exit_1", "train/tokens_per_s", "val/ppl", "val/loss"} <= set(
        tags["scalars"]
    )
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx(list(STEPS.values()))
    assert [(e.step, e.value) for e in events.Scalars("train/tokens_per_s")] == [(2, 200.0), (3, 300.0)]
    assert [(e.step, e.value) for e in events.Scalars("val/per_exit/1/ppl")] == [(3, 4.0)]
    assert {"config/text_summary", "status/text_summary"} <= set(tags["tensors"])
    table = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| model.dim | 16 |" in table and "| train.lr | 0.001 |" in table


def wandb_records(path: Path) -> list[Any]:
    """The records of a .wandb file (wandb's LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks,
    each `crc32 (4) | length (2) | type (1) | data`; type 1 = a whole record, 2/3/4 = first/middle/last part)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, part, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # the block's tail is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


@pytest.mark.timeout(120)  # wandb.init gives up after 60 s (WANDB_INIT_TIMEOUT_S) rather than hang
def test_wandb_offline_writes_the_run_in_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home" / var))
    monkeypatch.setenv("WANDB_MODE", "online")  # logger.mode (offline) wins: nothing tries the network
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    log_a_run(build_loggers(compose(["logger=wandb", "logger.run_name=seed0"]), tmp_path / "run"))
    runs = list((tmp_path / "run" / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    records = wandb_records(files[0])
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history[row["_step"]] = row
    assert sorted(history) == [1, 2, 3]
    assert [history[s]["train/loss"] for s in (1, 2, 3)] == list(STEPS.values())
    assert "train/tokens_per_s" not in history[1] and history[2]["train/tokens_per_s"] == 200.0
    assert history[3]["val/ppl"] == 3.5 and history[3]["val/per_exit/1/ppl"] == 4.0
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "seed0" and run.project == "ease"
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        updates = r.config.update if kind == "config" else r.run.config.update if kind == "run" else []
        config.update({item.key: json.loads(item.value_json) for item in updates})
    assert config == {**CONFIG, "_wandb": {}}  # wandb keeps the nesting
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits == [0]
    assert not [c for c in child_processes() if "wandb" in c]  # close ended wandb's service process


@pytest.mark.timeout(120)
def test_mlflow_with_a_tracking_uri_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file store named by logger.tracking_uri (fast: the default SQLite store is the slow test below)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the logger sets it by default; keep it per test here
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = (tmp_path / "mlruns").as_uri()
    cfg = compose(["logger=mlflow", f"logger.tracking_uri={uri}", "logger.project=exp1"])
    log_a_run(build_loggers(cfg, tmp_path / "run"), status="interrupted")
    check_mlflow_run(MlflowClient(tracking_uri=uri), "exp1", "KILLED")
    assert not (tmp_path / "run" / "logs").exists()  # the store is where the URI says


def test_mlflow_writes_per_step_metrics_in_batches_and_evaluations_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = (tmp_path / "mlruns").as_uri()
    loggers = build_loggers(LoggerConfig(name="mlflow", tracking_uri=uri), tmp_path / "run")
    (logger,) = loggers.loggers
    client = MlflowClient(tracking_uri=uri)
    loggers.log_metrics({"train/loss": 2.0}, 1)
    assert client.get_metric_history(logger.run_id, "train/loss") == []  # waiting in the buffer
    loggers.log_metrics({"val/ppl": 3.0}, 1)  # an evaluation: written at once, the waiting steps with it
    assert [m.value for m in client.get_metric_history(logger.run_id, "train/loss")] == [2.0]
    assert [m.value for m in client.get_metric_history(logger.run_id, "val/ppl")] == [3.0]
    loggers.log_metrics({"train/loss": 1.0}, 2)
    loggers.close("failed")  # close writes what waits
    assert [m.value for m in client.get_metric_history(logger.run_id, "train/loss")] == [2.0, 1.0]
    assert client.get_run(logger.run_id).info.status == "FAILED"


def check_mlflow_run(client: Any, experiment: str, status: str) -> Any:
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == status
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == list(STEPS.items())
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/tokens_per_s")] == [
        (2, 200.0), (3, 300.0),
    ]  # fmt: skip
    assert run.data.metrics["val/ppl"] == 3.5 and run.data.metrics["val/per_exit/1/ppl"] == 4.0
    assert run.data.params["model.dim"] == "16" and run.data.params["objective"] == "['ppl']"
    assert run.data.params["checkpoint"] == "None"
    return run


@pytest.mark.timeout(120)
def test_mlflow_default_store_is_sqlite_in_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default store; mlflow makes its tables for each new SQLite store (about 2.5 s here, 7 s the very first
    time, while Python compiles mlflow's migrations)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    loggers = build_loggers(compose(["logger=mlflow"]), tmp_path / "run")
    loggers.log_config({"long": "x" * 10_000, "odd key!": 1})  # cut to mlflow's limit; the key made valid
    log_a_run(loggers)
    db = tmp_path / "run" / "logs" / "mlflow" / "mlflow.db"
    assert db.is_file()
    run = check_mlflow_run(MlflowClient(tracking_uri=f"sqlite:///{db}"), "ease", "FINISHED")
    assert 500 <= len(run.data.params["long"]) < 10_000 and run.data.params["odd key_"] == "1"
    assert run.info.run_name == f"{tmp_path.name}/run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing in the cwd


# --- end to end -----------------------------------------------------------------------------------------------


def test_train_app_logs_steps_and_evaluations_to_csv(tmp_path: Path) -> None:
    """`python train.py logger=csv model=tiny data=synthetic train.max_epochs=2` (in-process): per-step train/loss
    rows and a val/ppl row per evaluation in RUN/logs/csv/metrics.csv."""
    from ease.app.runner import run

    cfg = compose(["logger=csv", *FAST, "train.max_epochs=2", "train.patience=5"])
    record = run(cfg, tmp_path, ["logger=csv"])
    assert record["status"] == "ok"
    rows = read_csv(tmp_path / "logs" / "csv" / "metrics.csv")
    steps = [int(r["step"]) for r in rows if r["train/loss"]]
    assert len(steps) >= 2 and steps == list(range(steps[0], steps[0] + len(steps)))
    assert all(float(r["train/loss"]) > 0 for r in rows if r["train/loss"])
    evaluations = [r for r in rows if r.get("val/ppl")]
    assert len(evaluations) == 2
    assert float(evaluations[-1]["val/ppl"]) > 1.0
    assert json.loads((tmp_path / "logs" / "csv" / "config.json").read_text())["logger"]["name"] == "csv"
