"""TrainConfig: the `train` group, the loop's and the optimiser's settings."""

import math
from dataclasses import dataclass

from ease.training.lr_schedule import LR_SCHEDULES

MONITORS = ("loss", "ppl", "routed_loss")
PRECISIONS = ("fp32", "bf16", "fp16")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """How long and how fast to train.

    Training runs by epochs (the seeds' presets) or, when `max_steps` is set, by optimizer steps with an
    evaluation every `eval_every` steps; early stopping then counts evaluations, and α schedules and the
    learning-rate schedule are planned over the steps.

    Attributes:
        max_epochs: epoch limit (each phase, for ASHEM); an α schedule is planned over it. Ignored when
            max_steps is set.
        max_steps: train for this many optimizer steps instead of epochs (null: by epochs).
        eval_every: steps between evaluations when training by steps (null: once per pass over the data,
            at most max_steps).
        eval_batches: validation batches per evaluation during training (null: all); the final evaluation
            always uses every batch.
        patience: evaluations (epochs, or eval_every intervals) without improvement before early stopping.
        batch_size: sequences per batch.
        lr: base learning rate (AdamW), scaled per layer by lr_scales.
        weight_decay: AdamW weight decay, >= 0.
        grad_clip: gradient-norm clip, > 0; null or 0 = no clipping.
        monitor: validation quantity early stopping watches: "loss" (the weighted objective; the routed loss
            when an α schedule moves the weights), "ppl" or "routed_loss".
        lr_schedule: constant | linear | cosine, after `warmup_steps` of linear warm-up, decaying to `min_lr`
            over the run's optimizer steps (`ease.training.lr_schedule`).
        grad_accum: micro-batches of `batch_size` per optimizer step (effective batch batch_size × grad_accum;
            the loss is token-weighted over the step, so 2 × 16 equals 1 × 32).
        precision: fp32 | bf16 | fp16: autocast dtype of forward passes (fp16 adds a gradient scaler; CUDA only).
        distributed: ddp | fsdp: the data-parallel engine under torchrun (FSDP2 shards each block).
    """

    max_epochs: int | None = 50
    max_steps: int | None = None
    eval_every: int | None = None
    eval_batches: int | None = None
    patience: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    monitor: str = "loss"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_accum: int = 1
    precision: str = "fp32"
    distributed: str = "ddp"

    def __post_init__(self) -> None:
        for name in ("patience", "batch_size", "grad_accum"):
            _check_count(name, getattr(self, name))
        for name in ("max_epochs", "max_steps", "eval_every", "eval_batches"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name))
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("train.max_steps: set train.max_steps or train.max_epochs (both are null)")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps: must be an int >= 0, got {self.warmup_steps!r}")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"train.warmup_steps: must be below train.max_steps ({self.max_steps}), got {self.warmup_steps}"
            )
        for key, value, allowed in (
            ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
            ("precision", self.precision, PRECISIONS),
            ("distributed", self.distributed, DISTRIBUTED),
        ):
            if value not in allowed:
                raise ValueError(f"train.{key}: must be one of {', '.join(allowed)}, got {value!r}")
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
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"train.min_lr: must be a finite number in [0, train.lr={self.lr}], got {self.min_lr}")

    @property
    def by_steps(self) -> bool:
        """True when training runs by optimizer steps (max_steps set), not by epochs."""
        return self.max_steps is not None


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"train.{name}: must be an int >= 1, got {value!r}")
