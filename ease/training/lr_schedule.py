"""The learning-rate schedule: linear warm-up, then constant, linear or cosine decay to `min_lr`.

A pure function of the optimizer step, so a resumed run (which knows its step) needs no scheduler state:

    factor(s) = (s + 1) / W                                   for s < W (warm-up over W steps)
    factor(s) = r + (1 - r) * d(p),  p = (s - W) / (S - W)    after, with r = min_lr / lr and S total steps
    d(p) = 1 (constant), 1 - p (linear), (1 + cos(π p)) / 2 (cosine)

Each param group's rate is its base rate (train.lr × its per-layer scale) times the factor, so per-layer
learning-rate ratios hold throughout.
"""

import math
from dataclasses import dataclass

import torch

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(
    step: int, total_steps: int, warmup_steps: int = 0, kind: str = "constant", min_ratio: float = 0.0
) -> float:
    """The multiplier of the base rate at optimizer step `step` (0-based) of `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    decay = 1.0 - progress if kind == "linear" else (1.0 + math.cos(math.pi * progress)) / 2.0
    return min_ratio + (1.0 - min_ratio) * decay


@dataclass
class LrSchedule:
    """`lr_factor` with its settings; `apply` sets every param group's rate for a step."""

    kind: str = "constant"
    warmup_steps: int = 0
    min_ratio: float = 0.0
    total_steps: int = 1

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule: must be one of {', '.join(LR_SCHEDULES)}, got {self.kind!r}")

    @property
    def is_constant(self) -> bool:
        return self.kind == "constant" and self.warmup_steps == 0

    def factor(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, self.kind, self.min_ratio)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set each group's lr to its base rate × the factor at `step`; returns the factor."""
        factor = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
        return factor
