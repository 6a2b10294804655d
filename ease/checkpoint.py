"""Saving and loading models with what is needed to use them again (architecture, tokenizer, metadata).

Writes are atomic: a temporary file in the same folder, then a rename, so a kill mid-write never leaves
a truncated checkpoint where a good one was.
"""

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ease.model import EarlyExitTransformer


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
