"""Layer dropout (LayerSkip, Elhoushi et al. 2024): in training, each example skips layer i with rate p_i.

A skipped example passes layer i through the residual: its hidden state leaves the layer unchanged. Only the
kept rows are computed, `model.layer(i, h[keep])`, which works for any backbone since a layer takes any batch
size. The rates grow with depth up to `max_rate`, shaped by `scale` (LayerSkip's / torchtune's `get_scale`
over the layer index 0..L-1 with period L-1): p_i = max_rate · scale((i-1) / (L-1)). Evaluation never drops.

The draws come from a `torch.Generator` the trainer seeds from (seed, step, rank) at every optimizer step, so a
resumed run drops the same rows at the same steps.
"""

import math
from dataclasses import dataclass

import torch

from ease.model.backbone import Backbone, LayerFn

SCALES = ("uniform", "linear", "exp", "log", "sin", "sigmoid", "step")


def scale_at(scale: str, index: int, period: int) -> float:
    """The share of max_rate at layer index `index` (0-based) of `period` + 1 layers: 0 at the first layer and
    1 at the last (sigmoid: 0.007 and 0.993), uniform 1 everywhere; 1 for a one-layer model (period 0)."""
    if period == 0:
        return 1.0
    t = index / period
    if scale == "uniform":
        return 1.0
    if scale == "linear":
        return t
    if scale == "exp":
        return math.exp(t * math.log(2)) - 1  # 2^t - 1
    if scale == "log":
        return math.log(index + 1) / math.log(period + 1)
    if scale == "sin":
        return math.sin(0.5 * math.pi * t)
    if scale == "sigmoid":
        return 1 / (1 + math.exp(-10 * (t - 0.5)))
    if scale == "step":
        return float(index >= period)  # the last layer only
    raise ValueError(f"layer_dropout.scale: must be one of {', '.join(SCALES)}, got {scale!r}")


def dropout_rates(num_layers: int, max_rate: float, scale: str) -> dict[int, float]:
    """{layer: p_i} for layers 1..L."""
    return {i: max_rate * scale_at(scale, i - 1, num_layers - 1) for i in range(1, num_layers + 1)}


@dataclass
class LayerDropoutConfig:
    """The `layer_dropout` group.

    Attributes:
        max_rate: the deepest layer's skip rate, in [0, 1); 0 = off (the default).
        scale: how the rate grows with depth: uniform | linear | exp | log | sin | sigmoid | step.
    """

    max_rate: float = 0.0
    scale: str = "exp"

    def __post_init__(self) -> None:
        if isinstance(self.max_rate, bool) or not (math.isfinite(self.max_rate) and 0.0 <= self.max_rate < 1.0):
            raise ValueError(f"layer_dropout.max_rate: must be in [0, 1), got {self.max_rate}")
        if self.scale not in SCALES:
            raise ValueError(f"layer_dropout.scale: must be one of {', '.join(SCALES)}, got {self.scale!r}")

    @property
    def enabled(self) -> bool:
        return self.max_rate > 0


class LayerDropout:
    """Per-example layer dropout with given rates; counts what it dropped (`record`).

    Args:
        rates: {layer: p_i}.
        seed: the run's seed; the generator of each step is seeded from (seed, step, rank).
    """

    def __init__(self, rates: dict[int, float], seed: int = 0) -> None:
        self.rates = dict(rates)
        self.seed = seed
        self.dropped = dict.fromkeys(self.rates, 0)  # rows that skipped each layer
        self.rows = dict.fromkeys(self.rates, 0)  # rows that reached each layer

    def generator(self, step: int, rank: int = 0) -> torch.Generator:
        """A CPU generator for one optimizer step, a function of (seed, step, rank) only."""
        mixed = (self.seed * 1_000_003 + step) * 65_537 + rank
        return torch.Generator().manual_seed(mixed % (2**63))

    def layer_fn(self, model: Backbone, generator: torch.Generator) -> LayerFn:
        """`layer_fn(i, h)` for `hidden_states`: layer i on the kept rows of h; the dropped rows pass through."""

        def run(i: int, h: torch.Tensor) -> torch.Tensor:
            rate = self.rates.get(i, 0.0)
            if rate == 0.0:
                return model.layer(i, h)
            drop = torch.rand(h.shape[0], generator=generator) < rate  # (B,), on the CPU: device-independent
            self.rows[i] += h.shape[0]
            self.dropped[i] += int(drop.sum())
            keep = (~drop).nonzero().squeeze(1)
            if keep.numel() == h.shape[0]:
                return model.layer(i, h)
            if keep.numel() == 0:
                return h
            keep = keep.to(h.device)
            return h.index_copy(0, keep, model.layer(i, h.index_select(0, keep)))  # (B, T, C)

        return run

    def record(self) -> dict:
        """Per layer: the configured rate and the share of rows it actually dropped."""
        return {
            "rates": {i: p for i, p in self.rates.items()},
            "dropped_share": {i: self.dropped[i] / self.rows[i] if self.rows[i] else 0.0 for i in self.rates},
            "rows": dict(self.rows),
        }

    def state_dict(self) -> dict:
        return {"dropped": dict(self.dropped), "rows": dict(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        self.dropped = {int(k): int(v) for k, v in state.get("dropped", {}).items()} or self.dropped
        self.rows = {int(k): int(v) for k, v in state.get("rows", {}).items()} or self.rows
