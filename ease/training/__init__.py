"""Training: the one loop (`fit`), the `Trainer` of weighted early-exit objectives, and resumable state.

loop.py     fit(): epochs, early stopping, best-weights restore, on_epoch_end callbacks
trainer.py  Trainer: losses per batch, per-layer learning rates, routed evaluation, the α schedule
state.py    EarlyStoppingState and the RNG / optimizer state a resume restores
"""

from ease.training.loop import EpochOutcome, Validation, fit
from ease.training.state import EarlyStoppingState, rng_state, set_rng_state
from ease.training.trainer import (
    BatchLoss,
    EpochResult,
    NonFiniteLossError,
    Trainer,
    UniversalTrainer,
    check_finite,
    optimizer_step,
)

__all__ = [
    "BatchLoss",
    "EarlyStoppingState",
    "EpochOutcome",
    "EpochResult",
    "NonFiniteLossError",
    "Trainer",
    "UniversalTrainer",
    "Validation",
    "check_finite",
    "fit",
    "optimizer_step",
    "rng_state",
    "set_rng_state",
]
