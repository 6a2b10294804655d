"""The plain function behind `train.py`: build from a config, run the task, always leave a record.

`run(cfg, output_dir)` is callable from Python without Hydra's launcher; `hydra_main(cfg)` is what
`@hydra.main` wraps. A run writes into its output folder:
  metrics.json   status ("ok" / "failed" + error), metrics, resolved config, overrides, objective
  checkpoint.pt  the trained model with its tokenizer and config (task=train)
  train.log      Hydra's job log
"""

import importlib
import logging
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ease.app import build
from ease.app.records import METRICS_FILE, make_record, write_json_atomic
from ease.checkpoint import load_weights_into, restore_training_state, save_checkpoint, training_state
from ease.data import build_data
from ease.seed import set_seed
from ease.strategies.report import final_metrics
from ease.trainer import EarlyStoppingState, Trainer

log = logging.getLogger("ease")


class RunError(Exception):
    """A failure already explained in one line (the message); no traceback needed."""


def validate(cfg: DictConfig) -> None:
    """Every check that can run before data is read or a model is built."""
    build.check_run_settings(cfg)
    build.data_config(cfg)
    # task=eval/generate take the model from the checkpoint and check routing against it there.
    if cfg.strategy.name == "standard" and cfg.task.name == "train":
        build.training_config(cfg)
    importlib.import_module("ease.strategies").validate_strategy(cfg)  # ashem / token_routed settings


def summary_table(metrics: dict[str, Any]) -> str:
    """A short table for the end of a run: routed metrics, then each exit on its own."""
    from tabulate import tabulate

    rows = [
        ["routed", metrics["ppl"], 100 * metrics["acc"], 100 * metrics["shallow_ratio"], 100 * metrics["compute_cost"]]
    ]
    for layer, m in metrics.get("per_exit", {}).items():
        rows.append([f"L{layer} only", m["ppl"], 100 * m["acc"], None, None])
    return tabulate(rows, headers=["eval", "PPL", "Acc%", "Shallow%", "Compute%"], floatfmt=".2f", missingval="")


def _kill_hook(epoch: int) -> None:
    """Test-only: EASE_TEST_KILL_AFTER_EPOCH=N kills the process (SIGKILL) right after epoch N's checkpoint."""
    if os.environ.get("EASE_TEST_KILL_AFTER_EPOCH") == str(epoch):
        os.kill(os.getpid(), signal.SIGKILL)


def train_standard(cfg: DictConfig, data: Any, output_dir: Path) -> dict[str, Any]:
    """Weighted training of the whole model, early stopping, final routed evaluation + threshold curve.

    With save_checkpoint (default), checkpoint.pt is rewritten atomically at every epoch end with the
    weights, optimizer, α-schedule position, RNG states and early-stopping state; `resume=true` in the same
    run folder carries on from it and ends with the same metrics as an uninterrupted run.
    """
    config = build.training_config(cfg)
    model = build.model(cfg, data.vocab_size).to(cfg.device)
    if cfg.compile:  # torch.compile wins in training, not in decoding (README, Speed)
        for block in model.layers:
            block.compile()
    trainer = Trainer(config, data.vocab_size, cfg.device, cfg.train.grad_clip, progress=cfg.progress)
    optimizer = trainer.create_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    log.info("model: %d layers, dim %d, %d parameters", model.num_layers, model.dim, model.num_parameters())
    ckpt_path = output_dir / "checkpoint.pt"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tokenizer = data.tokenizer.to_dict()

    def save(stopping: EarlyStoppingState, completed: bool, **extra: Any) -> None:
        if cfg.save_checkpoint:
            state = training_state(trainer, optimizer, stopping, completed)
            save_checkpoint(ckpt_path, model, tokenizer, config=resolved, train_state=state, **extra)

    def on_epoch_end(epoch: int, stopping: EarlyStoppingState) -> None:
        save(stopping, completed=False)
        _kill_hook(epoch)

    stopping = resume_state(cfg, ckpt_path, model, trainer, optimizer) or EarlyStoppingState()
    result = trainer.train_with_early_stopping(
        model, data.train, data.val, optimizer, cfg.train.max_epochs, cfg.train.patience, True, cfg.train.monitor,
        state=stopping, on_epoch_end=on_epoch_end,
    )  # fmt: skip
    metrics = final_metrics(trainer, model, data, result, list(cfg.routing.analysis_thresholds))
    save(stopping, completed=True, metrics={k: metrics[k] for k in ("ppl", "acc", "shallow_ratio", "compute_cost")})
    return metrics


def resume_state(
    cfg: DictConfig, ckpt_path: Path, model: Any, trainer: Trainer, optimizer: torch.optim.Optimizer
) -> EarlyStoppingState | None:
    """With resume=true and a checkpoint.pt in the run folder, restore it; else start fresh."""
    if not cfg.resume:
        return None
    if not ckpt_path.is_file():
        log.warning("resume=true but %s does not exist: starting from scratch", ckpt_path)
        return None
    ckpt = torch.load(ckpt_path, map_location=cfg.device, weights_only=False)
    if "train_state" not in ckpt:
        raise ValueError(f"resume: {ckpt_path} holds no training state (saved by another task?)")
    saved = ckpt["train_state"].get("strategy", "standard")
    if saved != cfg.strategy.name:
        raise ValueError(f"resume: {ckpt_path} was saved by strategy={saved}, this run is strategy={cfg.strategy.name}")
    load_weights_into(model, ckpt, ckpt_path)
    stopping = restore_training_state(ckpt["train_state"], trainer, optimizer)
    log.info("resumed from %s after epoch %d", ckpt_path, len(stopping.history))
    return stopping


def train_task(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """task=train: load data, then train with the configured strategy."""
    data = build_data(build.data_config(cfg), seed=cfg.seed)
    if cfg.strategy.name == "standard":
        return train_standard(cfg, data, output_dir)
    from ease.strategies import run_strategy

    return run_strategy(cfg, data, output_dir)


# task name -> "module:function" taking (cfg, output_dir) and returning the metrics dict.
TASKS = {
    "train": "ease.app.runner:train_task",
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
    try:
        metrics = run_task(cfg, output_dir)
    except BaseException as err:
        message = f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)
        record = make_record("failed", cfg.task.name, {}, resolved, overrides, error=message, started=started)
        record["traceback"] = traceback.format_exc()
        write_json_atomic(output_dir / METRICS_FILE, record)
        raise
    values = objective_values(cfg, metrics)
    objective = {"names": list(cfg.objective), "values": values}
    record = make_record("ok", cfg.task.name, metrics, resolved, overrides, objective, started=started)
    write_json_atomic(output_dir / METRICS_FILE, record)
    if "ppl" in metrics:
        print(summary_table(metrics), file=sys.stderr)
    log.info("metrics written to %s", output_dir / METRICS_FILE)
    return record


def hydra_main(cfg: DictConfig) -> float | list[float]:
    """Hydra's task function: run, then return the objective(s) for a sweeper.

    A single run that fails prints one line and exits non-zero (debug=true shows the traceback). In a
    multirun, a failed job returns NaN instead, which Optuna records as a FAIL trial without stopping
    the sweep; its metrics.json says status failed and why.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    try:
        record = run(cfg, hc.runtime.output_dir, list(hc.overrides.task))
        values = record["objective"]["values"]
    except Exception as err:
        message = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
        if cfg.debug:
            raise
        if hc.mode == RunMode.RUN:
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)
        log.error("job failed: %s", message)
        values = [math.nan] * len(cfg.objective)
    return values[0] if len(values) == 1 else values
