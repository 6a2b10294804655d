"""The α schedule (seed 001): α, the weight of the shallow exit, moves during training.

The last layer gets 1-α and every other layer keeps its configured weight. With E = train.max_epochs and
e = 0..E-1 the epoch, progress is t = e / (E - 1) (t = 0 when E = 1), and

    constant: α(t) = start
    linear:   α(t) = start + (end - start) * t
    cosine:   α(t) = end + (start - end) * (1 + cos(π t)) / 2

so the first epoch trains with `start` and epoch E with `end`. The schedule is planned over max_epochs, so
when early stopping ends the run sooner α stops short of `end`: every run reports the α it actually reached
(`alpha_schedule.reached` in metrics.json) and the weights of the epoch it kept.
"""

import math
from dataclasses import dataclass

SCHEDULE_KINDS = ("constant", "linear", "cosine")


@dataclass
class AlphaSchedule:
    """α over training: `AlphaSchedule('linear', start=0.9, end=0.5)`; `end` defaults to `start`."""

    kind: str = "constant"
    start: float = 0.7
    end: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"alpha_schedule.kind: must be one of {list(SCHEDULE_KINDS)}, got {self.kind!r}")
        if self.end is None:
            self.end = self.start
        for name in ("start", "end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"alpha_schedule.{name}: must be in [0, 1], got {value}")

    def value(self, progress: float) -> float:
        """α at progress t in [0, 1]."""
        t = min(max(progress, 0.0), 1.0)
        end = float(self.end)  # set in __post_init__
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return self.start + (end - self.start) * t
        return end + (self.start - end) * (1.0 + math.cos(math.pi * t)) / 2.0

    def at_epoch(self, epoch: int, total_epochs: int) -> float:
        """α for epoch e (0-based) of E."""
        return self.value(epoch / (total_epochs - 1) if total_epochs > 1 else 0.0)

    @property
    def is_constant(self) -> bool:
        return self.kind == "constant" or self.start == self.end


@dataclass
class ScheduleConfig:
    """The `schedule` group: how α moves; `start` None = loss_weights.alpha."""

    kind: str = "constant"
    start: float | None = None
    end: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule.kind: must be one of {', '.join(SCHEDULE_KINDS)}, got {self.kind!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"schedule.{name}: must be in [0, 1], got {value}")

    def schedule(self, alpha: float) -> AlphaSchedule | None:
        """The AlphaSchedule starting at `start` (or `alpha`); None for a constant α."""
        if self.kind == "constant":
            return None
        return AlphaSchedule(self.kind, alpha if self.start is None else self.start, self.end)


def apply_alpha(weights: dict[int, float], alpha: float, shallow: int, last: int) -> dict[int, float]:
    """The layer weights with α on `shallow` and 1-α on `last`; other layers unchanged."""
    out = dict(weights)
    out[shallow] = alpha
    out[last] = 1.0 - alpha
    return out
