"""Early-stopping state and the training state a resume needs (optimizer, schedule position, RNGs).

Every value here is plain data (tensors, numbers, lists, dicts), so a checkpoint holding it loads with
`torch.load(weights_only=True)`.
"""

import math
import random
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch


@dataclass
class EarlyStoppingState:
    """Everything early stopping needs to carry on after a restart."""

    best_metric: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict, sharing (not copying) the tensors: save it at once."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from: Python, NumPy, torch CPU (and CUDA when present), as plain data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
