"""Saving and loading models with what is needed to use them again (architecture, tokenizer, metadata).

Writes are atomic: a temporary file in the same folder, then a rename, so a kill mid-write never leaves
a truncated checkpoint where a good one was.
"""

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ease.model import EarlyExitTransformer
from ease.trainer import EarlyStoppingState, Trainer


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` through a temporary file and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_checkpoint_path(value: str | None, task: str) -> Path:
    """`checkpoint=` as a file: a checkpoint.pt, or a run folder holding one; one-line errors otherwise."""
    if not value:
        raise ValueError(
            f"checkpoint: task={task} needs checkpoint=PATH (a checkpoint.pt or the run folder holding it)"
        )
    path = Path(value).expanduser()
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"checkpoint: file not found: {path}")
    return path.resolve()


def save_checkpoint(path: str | Path, model: EarlyExitTransformer, tokenizer: dict | None = None, **extra: Any) -> None:
    """Model weights + constructor arguments + the tokenizer's dict + anything else (e.g. the config)."""
    atomic_save({"model_args": model.config_dict(), "model": model.state_dict(), "tokenizer": tokenizer, **extra}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[EarlyExitTransformer, dict]:
    """Rebuild the model from a checkpoint; returns (model, the whole checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: file not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated or foreign files raise many different errors
        raise ValueError(f"checkpoint: cannot read {path}: {type(err).__name__}: {err}") from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        raise ValueError(f"checkpoint: {path} is not an EASE checkpoint (no model_args/model)")
    model = EarlyExitTransformer(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model, ckpt


def load_weights_into(model: EarlyExitTransformer, ckpt: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint's weights into an already built model, with a one-line error on a size mismatch."""
    theirs, ours = ckpt.get("model_args", {}), model.config_dict()
    for key in ("vocab_size", "dim", "num_layers", "num_heads", "hidden_dim"):
        if theirs.get(key) != ours[key]:
            raise ValueError(f"checkpoint: {path} has {key}={theirs.get(key)}, the configured model has {ours[key]}")
    model.load_state_dict(ckpt["model"])


# --- training state, for resuming --------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from: Python, NumPy, torch CPU (and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(
    trainer: Trainer, optimizer: torch.optim.Optimizer, stopping: EarlyStoppingState, completed: bool
) -> dict[str, Any]:
    """What `resume` needs beyond the weights: optimizer, schedule position, RNGs, early-stopping state."""
    return {
        "epoch": len(stopping.history),
        "completed": completed,
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "trainer": {"epoch": trainer.epoch, "weight_history": trainer.weight_history},
        "early_stopping": {
            "best_metric": stopping.best_metric,
            "best_epoch": stopping.best_epoch,
            "bad_epochs": stopping.bad_epochs,
            "best_state": stopping.best_state,
            "history": stopping.history,
        },
    }


def restore_training_state(
    state: dict[str, Any], trainer: Trainer, optimizer: torch.optim.Optimizer
) -> EarlyStoppingState:
    """Put the optimizer, trainer and RNGs back where `training_state` found them."""
    optimizer.load_state_dict(state["optimizer"])
    trainer.epoch = state["trainer"]["epoch"]
    trainer.weight_history = list(state["trainer"]["weight_history"])
    set_rng_state(state["rng"])
    return EarlyStoppingState(**state["early_stopping"])
