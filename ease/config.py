"""TrainingConfig: which layers get loss and how much, how they learn, and how tokens exit.

The three knobs are independent (seed 002): loss weights (where the loss is), learning-rate scales (how
fast each layer learns), and routing (where a token stops at inference). `UniversalConfig` is the same
class under the name seed 000 uses.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ease.losses import uniform
from ease.routing import CONFIDENCES, normalize_routing
from ease.schedule import AlphaSchedule


@dataclass
class StageConfig:
    """A LEGO stage (seed 002): train the block of layers x..y as a standard LM on layer y.

    `layers=(2, 2)` puts the loss on layer 2. Which parameters actually update is decided separately
    (requires_grad / freezing), as the seed keeps the two independent.
    """

    layers: tuple[int, int]
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if len(self.layers) != 2:
            raise ValueError(f"stages.layers: must be a pair (first, last), got {self.layers!r}")
        first, last = (int(v) for v in self.layers)
        if not 1 <= first <= last:
            raise ValueError(f"stages.layers: must satisfy 1 <= first <= last, got ({first}, {last})")
        self.layers = (first, last)
        if not (math.isfinite(self.loss_weight) and self.loss_weight >= 0):
            raise ValueError(f"stages.loss_weight: must be a finite number >= 0, got {self.loss_weight}")


def _check_layer_map(name: str, mapping: Mapping, positive: bool) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in mapping.items():
        try:
            layer = int(key)
            weight = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: keys must be layer numbers and values numbers, got {key!r}: {value!r}") from None
        if layer < 1:
            raise ValueError(f"{name}: layers are 1-indexed (>= 1), got layer {layer}")
        low_ok = weight > 0 if positive else weight >= 0
        if not (math.isfinite(weight) and low_ok):
            allowed = "> 0" if positive else ">= 0"
            raise ValueError(f"{name}: layer {layer} must be a finite number {allowed}, got {value}")
        out[layer] = weight
    return out


@dataclass
class TrainingConfig:
    """How an early-exit model is trained and routed.

    Attributes:
        layer_weights: {layer: weight} (1-indexed, each >= 0, at least one > 0); loss = Σ w_l CE_l.
            Layers not listed get weight 0 and their heads are never computed in training.
        exit_layer: routing exit layer, or a list of them for a cascade.
        routing_threshold: confidence a token needs to exit (0 = no routing); one per exit layer, or one
            value for all of them.
        layer_lr_scales: {layer: scale} multiplying the base learning rate of that block (default 1.0).
        alpha_schedule: moves α (the shallow exit's weight; the last layer gets 1-α) across epochs.
        stages: LEGO stages (seed 002); each adds its loss_weight at its last layer. Use instead of
            layer_weights.
        confidence: the confidence measure used for routing ("max_prob", "top2_margin", "neg_entropy").
        embedding_lr_scale: LR scale of the embedding; None = that of layer 1 (it sits below layer 1).
        head_lr_scale: LR scale of the shared final norm + output head, used by every exit (default 1.0).
    """

    layer_weights: dict[int, float] | None = None
    exit_layer: int | Sequence[int] = 1
    routing_threshold: float | Sequence[float] = 0.95
    layer_lr_scales: dict[int, float] | None = None
    alpha_schedule: AlphaSchedule | None = None
    stages: list[StageConfig] | None = None
    confidence: str = "max_prob"
    embedding_lr_scale: float | None = None
    head_lr_scale: float = 1.0
    exit_layers: tuple[int, ...] = field(init=False, repr=False)
    routing_thresholds: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.stages is not None:
            if self.layer_weights is not None:
                raise ValueError("stages: give either stages or layer_weights, not both")
            self.stages = [s if isinstance(s, StageConfig) else StageConfig(**s) for s in self.stages]
            if not self.stages:
                raise ValueError("stages: at least one stage is required")
            deepest = max(stage.layers[1] for stage in self.stages)
            weights = {layer: 0.0 for layer in range(1, deepest + 1)}
            for stage in self.stages:
                last = stage.layers[1]
                weights[last] += stage.loss_weight
            self.layer_weights = weights
        if self.layer_weights is None:
            raise ValueError("layer_weights: required, e.g. {1: 0.7, 3: 0.3} (or give stages)")
        self.layer_weights = _check_layer_map("layer_weights", self.layer_weights, positive=False)
        if not any(w > 0 for w in self.layer_weights.values()):
            raise ValueError(f"layer_weights: at least one weight must be > 0, got {self.layer_weights}")
        self.exit_layers, self.routing_thresholds = normalize_routing(self.exit_layer, self.routing_threshold)
        if self.layer_lr_scales is not None:
            self.layer_lr_scales = _check_layer_map("layer_lr_scales", self.layer_lr_scales, positive=True)
        for name in ("embedding_lr_scale", "head_lr_scale"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {value}")
        if isinstance(self.alpha_schedule, Mapping):
            self.alpha_schedule = AlphaSchedule(**self.alpha_schedule)
        if self.alpha_schedule is not None and not isinstance(self.alpha_schedule, AlphaSchedule):
            raise ValueError(f"alpha_schedule: must be an AlphaSchedule, got {type(self.alpha_schedule).__name__}")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"confidence: must be one of {', '.join(CONFIDENCES)}, got {self.confidence!r}")

    @property
    def routing_enabled(self) -> bool:
        return any(t > 0 for t in self.routing_thresholds)

    @property
    def shallow_layer(self) -> int:
        """The layer α applies to: the first exit layer."""
        return self.exit_layers[0]

    def check_model(self, num_layers: int) -> None:
        """Raise a one-line ValueError when the config names a layer the model does not have."""
        for name, mapping in (("layer_weights", self.layer_weights), ("layer_lr_scales", self.layer_lr_scales)):
            bad = sorted(layer for layer in (mapping or {}) if layer > num_layers)
            if bad:
                raise ValueError(f"{name}: layers must be in 1..{num_layers} for a {num_layers}-layer model, got {bad}")
        normalize_routing(self.exit_layers, self.routing_thresholds, num_layers)
        if self.alpha_schedule is not None and self.shallow_layer >= num_layers:
            raise ValueError(f"alpha_schedule: the shallow exit_layer must be below layer {num_layers}")

    def weights_for(self, num_layers: int) -> dict[int, float]:
        """Every layer's base weight (0 where unset), before any α schedule."""
        return {layer: float((self.layer_weights or {}).get(layer, 0.0)) for layer in range(1, num_layers + 1)}


UniversalConfig = TrainingConfig  # seed 000's name


def create_standard_config(num_layers: int) -> TrainingConfig:
    """Standard LM as a one-stage LEGO config: loss on the last layer only ({1: 0, 2: 0, 3: 1}), no routing."""
    return TrainingConfig(
        stages=[StageConfig(layers=(num_layers, num_layers), loss_weight=1.0)], exit_layer=1, routing_threshold=0.0
    )


def create_deep_supervision_config(num_layers: int, routing_threshold: float = 0.0) -> TrainingConfig:
    """Deep supervision: 1/L on every layer, no routing unless asked."""
    return TrainingConfig(layer_weights=uniform(num_layers), exit_layer=1, routing_threshold=routing_threshold)


LR_SCALE_KINDS = ("uniform", "decreasing", "increasing", "custom")


@dataclass
class LrScalesConfig:
    """The `lr_scales` group: per-layer learning-rate scales.

    Attributes:
        kind: uniform | decreasing | increasing | custom.
        scales: one scale per layer, shallowest first. decreasing/increasing hold seed 001's 3-layer lists and
            are resampled (piecewise-linearly over depth) for other depths; custom must give one per layer.
        embedding: LR scale of the embedding; None = layer 1's.
        head: LR scale of the shared final norm + output head.
    """

    kind: str = "uniform"
    scales: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    embedding: float | None = None
    head: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in LR_SCALE_KINDS:
            raise ValueError(f"lr_scales.kind: must be one of {', '.join(LR_SCALE_KINDS)}, got {self.kind!r}")
        if self.kind != "uniform" and not self.scales:
            raise ValueError("lr_scales.scales: needs at least one value")
        for value in self.scales:
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"lr_scales.scales: each must be a finite number > 0, got {value}")
        for name in ("embedding", "head"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"lr_scales.{name}: must be a finite number > 0, got {value}")

    def scales_for(self, num_layers: int) -> dict[int, float] | None:
        """{layer: scale} for an L-layer model (None for uniform)."""
        if self.kind == "uniform":
            return None
        values = [float(v) for v in self.scales]
        if self.kind == "custom" and len(values) != num_layers:
            raise ValueError(f"lr_scales.scales: custom needs one scale per layer ({num_layers}), got {values}")
        # Piecewise-linear resampling over relative depth: exact for a 3-layer model and 3 values.
        src = np.linspace(0.0, 1.0, len(values))
        dst = np.linspace(0.0, 1.0, num_layers)
        return {i + 1: float(v) for i, v in enumerate(np.interp(dst, src, values))}
