"""TrainConfig: the `train` group, the loop's and the optimiser's settings."""

import math
from dataclasses import dataclass

MONITORS = ("loss", "ppl", "routed_loss")


@dataclass
class TrainConfig:
    """How long and how fast to train.

    Attributes:
        max_epochs: epoch limit (each phase, for ASHEM); an α schedule is planned over it.
        patience: epochs without improvement before early stopping.
        batch_size: sequences per batch.
        lr: base learning rate (AdamW), scaled per layer by lr_scales.
        weight_decay: AdamW weight decay, >= 0.
        grad_clip: gradient-norm clip, > 0; null or 0 = no clipping.
        monitor: validation quantity early stopping watches: "loss" (the weighted objective; the routed loss
            when an α schedule moves the weights), "ppl" or "routed_loss".
    """

    max_epochs: int = 50
    patience: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    monitor: str = "loss"

    def __post_init__(self) -> None:
        for name in ("max_epochs", "patience", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name}: must be an int >= 1, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr: must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"train.weight_decay: must be a finite number >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(
                f"train.grad_clip: must be a finite number >= 0 (0 or null = no clipping), got {self.grad_clip}"
            )
        if self.monitor not in MONITORS:
            raise ValueError(f"train.monitor: must be one of {', '.join(MONITORS)}, got {self.monitor!r}")
