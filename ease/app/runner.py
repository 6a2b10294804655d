"""The plain function behind `train.py`: build from a config, run the task, always leave a record.

`run(cfg, output_dir)` is callable from Python without Hydra's launcher; `hydra_main(cfg)` is what
`@hydra.main` wraps. A run writes into its output folder:
  metrics.json   status ("ok" / "failed" + error), metrics, resolved config, overrides, objective
  checkpoint.pt  the trained model with its tokenizer and config (task=train)
  train.log      Hydra's job log
"""

import importlib
import json
import logging
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ease import distributed
from ease.app import build, train_task
from ease.app.pruning import TrialPruned, reporting
from ease.app.records import METRICS_FILE, make_record
from ease.io import remove_orphans, write_json_atomic
from ease.seed import set_seed
from ease.stop import StopRequested, stop_on_signals

log = logging.getLogger("ease")


class RunError(Exception):
    """A failure already explained in one line (the message); no traceback needed."""


def validate(cfg: DictConfig) -> None:
    """Every check that can run before data is read or a model is built."""
    build.check_run_settings(cfg)
    build.data_config(cfg)
    # task=eval/generate take the model from the checkpoint and check routing against it there.
    if cfg.task.name == "train":
        train_task.validate(cfg)


def summary_table(metrics: dict[str, Any]) -> str:
    """A short table for the end of a run: routed metrics, then each exit on its own."""
    from tabulate import tabulate

    rows = [
        ["routed", metrics["ppl"], 100 * metrics["acc"], 100 * metrics["shallow_ratio"], 100 * metrics["compute_cost"]]
    ]
    for layer, m in metrics.get("per_exit", {}).items():
        rows.append([f"L{layer} only", m["ppl"], 100 * m["acc"], None, None])
    return tabulate(rows, headers=["eval", "PPL", "Acc%", "Shallow%", "Compute%"], floatfmt=".2f", missingval="")


# task name -> "module:function" taking (cfg, output_dir) and returning the metrics dict.
TASKS = {
    "train": "ease.app.train_task:train_task",
    "eval": "ease.app.eval_task:eval_task",
    "generate": "ease.app.generate_task:generate_task",
}


def run_task(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Validate, seed and run the configured task; returns the metrics."""
    if cfg.task.name not in TASKS:
        raise ValueError(f"task: must be one of {', '.join(TASKS)}, got {cfg.task.name!r}")
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    module, function = TASKS[cfg.task.name].split(":")
    return getattr(importlib.import_module(module), function)(cfg, output_dir)


def objective_values(cfg: DictConfig, metrics: dict[str, Any] | None) -> list[float]:
    """The metrics named by `objective`, NaN where missing or non-finite (the sweeper's FAIL)."""
    values = []
    for name in cfg.objective:
        value = (metrics or {}).get(name)
        values.append(float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan)
    return values


def run(cfg: DictConfig, output_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run one job and write its metrics.json; returns the record. Raises after recording a failure."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    overrides = list(overrides or [])
    remove_orphans(output_dir)  # temporary files a SIGKILL left mid-write
    try:
        with stop_on_signals(), reporting(cfg, output_dir) as reporter:
            metrics = run_task(cfg, output_dir)
            if reporter is not None:
                reporter.finish(metrics)
    except TrialPruned as err:  # the sweep's pruner stopped this trial: a record of how far it got
        objective = {"names": list(cfg.objective), "values": [math.nan] * len(cfg.objective)}
        record = make_record("pruned", cfg.task.name, err.metrics, resolved, overrides, objective, str(err), started)
        write_record(output_dir, record)
        raise
    except StopRequested as err:  # SIGTERM / SIGINT: stopped between steps, where the checkpoint now stands
        record = make_record("interrupted", cfg.task.name, {}, resolved, overrides, error=str(err), started=started)
        record["signal"] = err.name
        write_record(output_dir, record)
        raise
    except BaseException as err:
        message = f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)
        record = make_record("failed", cfg.task.name, {}, resolved, overrides, error=message, started=started)
        record["traceback"] = traceback.format_exc()
        write_record(output_dir, record)
        raise
    values = objective_values(cfg, metrics)
    objective = {"names": list(cfg.objective), "values": values}
    record = make_record("ok", cfg.task.name, metrics, resolved, overrides, objective, started=started)
    write_record(output_dir, record)
    if "ppl" in metrics and distributed.current().is_main:
        print(summary_table(metrics), file=sys.stderr)
    if distributed.current().is_main:
        log.info("metrics written to %s", output_dir / METRICS_FILE)
    return record


def write_record(output_dir: Path, record: dict[str, Any]) -> None:
    """metrics.json; under torchrun rank 0 alone writes it."""
    if distributed.current().is_main:
        write_json_atomic(output_dir / METRICS_FILE, record)


def check_no_record(output_dir: Path) -> None:
    """A new run must not share a folder with another run's record (it would outlive an interrupted new run)."""
    path = output_dir / METRICS_FILE
    if path.is_file():
        try:
            status = json.loads(path.read_text(encoding="utf-8")).get("status", "?")
        except (OSError, ValueError):
            status = "unreadable"
        raise ValueError(
            f"hydra.run.dir: {output_dir} already holds a run's record (metrics.json, status {status}); pass "
            "resume=true to continue that run, or use a new folder"
        )


def check_hydra(hc: DictConfig) -> None:
    """Hydra settings a job refuses before it runs: `+sweep=NAME` without `-m`, and a job or study name that
    would put files outside the output folder (`hydra.job.name` names the log, the study name the database)."""
    from hydra.types import RunMode

    from ease.app.schema import check_plain_name, check_sweep_mode

    check_sweep_mode(list(hc.overrides.task), multirun=hc.mode == RunMode.MULTIRUN)
    check_plain_name("hydra.job.name", hc.job.name)
    study_name = OmegaConf.select(hc, "sweeper.study_name")
    if study_name is not None:
        check_plain_name("hydra.sweeper.study_name", study_name)


def hydra_main(cfg: DictConfig) -> float | list[float]:
    """Hydra's task function: run, then return the objective(s) for a sweeper.

    A single run that fails prints one line and exits non-zero (debug=true shows the traceback). In a
    multirun, a failed job returns NaN instead, which Optuna records as a FAIL trial without stopping
    the sweep; its metrics.json says status failed and why.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ease.app.errors import shorten

    hc = HydraConfig.get()
    try:
        check_hydra(hc)
        if hc.mode == RunMode.RUN and not cfg.resume:
            check_no_record(Path(hc.runtime.output_dir))
        record = run(cfg, hc.runtime.output_dir, list(hc.overrides.task))
        values = record["objective"]["values"]
    except TrialPruned as err:  # NaN to the sweeper, which records the trial PRUNED (the trial says so)
        log.info("job %s: %s", hc.job.num, err)
        values = [math.nan] * len(cfg.objective)
    except StopRequested as err:
        folder = hc.runtime.output_dir
        print(f"error: {err}; checkpoint.pt in {folder} holds the run where it stopped: continue with resume=true "
              f"hydra.run.dir={folder}", file=sys.stderr)  # fmt: skip
        sys.exit(128 + err.signum)
    except Exception as err:
        message = shorten(str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}")
        if cfg.debug:
            raise
        if hc.mode == RunMode.RUN:
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)
        log.error("job failed: %s", message)
        values = [math.nan] * len(cfg.objective)
    return values[0] if len(values) == 1 else values
