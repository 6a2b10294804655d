"""Loss-weight schemes and the α schedule.

Loss-weight schemes are small pure functions from the number of layers to {layer: weight} (1-indexed), in
the manner of torchtune's early-exit loss scales. They are not normalised unless they say so: the seeds'
setting B (α on L1, 1.0 on L2, 1-α on L3) sums to 2 on purpose.

The α schedule (seed 001) moves α, the weight of the shallow exit, during training; the last layer gets
1-α and every other layer keeps its configured weight. With E = max_epochs and e = 0..E-1 the epoch,
progress is t = e / (E - 1) (t = 0 when E = 1), and

    constant: α(t) = start
    linear:   α(t) = start + (end - start) * t
    cosine:   α(t) = end + (start - end) * (1 + cos(π t)) / 2

so the first epoch trains with `start` and epoch E (if early stopping lets it run) with `end`.
"""

import math
from dataclasses import dataclass

SCHEDULE_KINDS = ("constant", "linear", "cosine")


def final_only(num_layers: int) -> dict[int, float]:
    """Standard LM: the last layer alone."""
    return {layer: float(layer == num_layers) for layer in range(1, num_layers + 1)}


def uniform(num_layers: int) -> dict[int, float]:
    """Deep supervision (Lee et al., 2015): 1/L on every layer."""
    return {layer: 1.0 / num_layers for layer in range(1, num_layers + 1)}


def asymmetric(num_layers: int, alpha: float, shallow: int = 1, middle: float = 0.0) -> dict[int, float]:
    """α on the shallow exit, 1-α on the last layer, `middle` on every layer between (seed 003)."""
    weights = {layer: middle for layer in range(1, num_layers + 1)}
    weights[shallow] = alpha
    weights[num_layers] = 1.0 - alpha
    return weights


def linear_l(num_layers: int) -> dict[int, float]:
    """Weight proportional to depth, normalised to sum 1 (LayerSkip's `l` scale)."""
    total = num_layers * (num_layers + 1) / 2
    return {layer: layer / total for layer in range(1, num_layers + 1)}


def sqrt_l(num_layers: int) -> dict[int, float]:
    """Weight proportional to sqrt(depth), normalised to sum 1."""
    total = sum(math.sqrt(layer) for layer in range(1, num_layers + 1))
    return {layer: math.sqrt(layer) / total for layer in range(1, num_layers + 1)}


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


def apply_alpha(weights: dict[int, float], alpha: float, shallow: int, last: int) -> dict[int, float]:
    """The layer weights with α on `shallow` and 1-α on `last`; other layers unchanged."""
    out = dict(weights)
    out[shallow] = alpha
    out[last] = 1.0 - alpha
    return out
