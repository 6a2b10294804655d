"""The one training loop: epochs with early stopping, best-weights restore, callbacks, resumable state.

`fit` knows nothing of losses or data. A strategy hands it `train_epoch(epoch)` (one epoch of its own
loss on its own data) and `validate()` (the monitored value and the row entries to record); `fit` times
the epochs, keeps the history, tracks the best epoch, calls `on_epoch_end(epoch, state)` after every epoch
(checkpoints, loggers, tests' kill switches) and restores the best weights at the end. Everything it
carries between epochs is in `EarlyStoppingState`, so passing a saved state back resumes the loop.
"""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ease.training.state import EarlyStoppingState

log = logging.getLogger("ease.training")


@dataclass
class EpochOutcome:
    """What one training epoch reports: its history-row entries and how many positions it trained on."""

    row: dict[str, Any]  # at least "train_loss"
    positions: int


@dataclass
class Validation:
    """The monitored value (lower is better) and the history-row entries of one validation."""

    metric: float
    row: dict[str, Any]


EpochCallback = Callable[[int, EarlyStoppingState], None]


def fit(
    train_epoch: Callable[[int], EpochOutcome],
    validate: Callable[[], Validation],
    snapshot: Callable[[], dict[str, torch.Tensor]],
    restore: Callable[[dict[str, torch.Tensor]], None],
    max_epochs: int,
    patience: int,
    min_delta: float = 0.0,
    state: EarlyStoppingState | None = None,
    on_epoch_end: EpochCallback | None = None,
    describe: Callable[[dict[str, Any]], str] | None = None,
    first_epoch: int = 1,
) -> dict[str, Any]:
    """Train until `patience` epochs pass without the validated metric improving by more than `min_delta`.

    Args:
        train_epoch: runs epoch e (0-based; its data order must depend on (seed, e) only).
        validate: scores the current weights.
        snapshot: copies the weights to keep when an epoch improves; `restore` puts them back at the end.
        state: a saved state to resume from (its history says how many epochs are done).
        on_epoch_end: called after every epoch with the 1-based epoch number and the state.
        describe: a log line for a history row.
        first_epoch: the number the first row gets (rows are numbered first_epoch, first_epoch + 1, ...).

    Returns:
        best_epoch, best_metric, epochs_run, stopped_early, history, train_time_s (this call's wall time)
        and tokens_per_s (trained positions per second of training, over every epoch in the history).
    """
    if max_epochs < 1:
        raise ValueError(f"train.max_epochs: must be >= 1, got {max_epochs}")
    if patience < 1:
        raise ValueError(f"train.patience: must be >= 1, got {patience}")
    state = state or EarlyStoppingState()
    t0 = time.perf_counter()
    for epoch in range(len(state.history), max_epochs):
        if state.bad_epochs >= patience:  # a resumed run that had already stopped
            break
        t_epoch = time.perf_counter()
        outcome = train_epoch(epoch)
        seconds = time.perf_counter() - t_epoch + outcome.row.pop("resumed_seconds", 0.0)
        val = validate()
        improved = math.isfinite(val.metric) and val.metric < state.best_metric - min_delta
        number = first_epoch + epoch
        row = {
            "epoch": number,
            **outcome.row,
            **val.row,
            "train_time_s": seconds,
            "tokens_per_s": outcome.positions / seconds if seconds > 0 else None,
            "improved": improved,
        }
        state.history.append(row)
        if improved:
            state.best_metric, state.best_epoch, state.bad_epochs = val.metric, number, 0
            state.best_state = snapshot()
        else:
            state.bad_epochs += 1
        if describe is not None:
            log.info("%s%s", describe(row), " *" if improved else "")
        if on_epoch_end is not None:
            on_epoch_end(number, state)
    if state.best_state is not None:
        restore(state.best_state)
    train_seconds = sum(row["train_time_s"] for row in state.history)
    positions = sum(row["train_time_s"] * (row["tokens_per_s"] or 0.0) for row in state.history)
    return {
        "best_epoch": state.best_epoch,
        "best_metric": state.best_metric,
        "epochs_run": len(state.history),
        "stopped_early": state.bad_epochs >= patience,
        "history": state.history,
        "train_time_s": time.perf_counter() - t0,
        "tokens_per_s": positions / train_seconds if train_seconds > 0 else None,
    }
