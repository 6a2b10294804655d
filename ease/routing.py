"""Confidence-based early exit: confidence measures, cascade routing, and its cost.

A token exits at the first routing exit (in increasing layer order) whose confidence reaches that exit's
threshold; tokens that never do run to the last layer. A threshold of 0 disables its exit, so
`routing_threshold=0` means no routing at all (every token runs every layer), as in the seeds.
compute_cost = layers computed / total layers, averaged over tokens: the seeds' counted cost.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """Max softmax probability (the seeds' confidence). (..., V) -> (...)."""
    return F.softmax(logits.float(), dim=-1).amax(dim=-1)


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """Difference of the two largest probabilities (CALM's softmax-response variant)."""
    top = F.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def neg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """1 - H(p)/log(V): 1 for a one-hot prediction, 0 for uniform."""
    logp = F.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return 1.0 - entropy / torch.log(torch.tensor(float(logits.shape[-1])))


CONFIDENCE_MEASURES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max_prob": max_prob,
    "top2_margin": top2_margin,
    "neg_entropy": neg_entropy,
}


def saturation(hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """CALM's hidden-state saturation: cos(h_e, h_{e-1}), the exit layer's output against its input.

    (..., C), (..., C) -> (...). At layer 1 the input is the token embedding (what `Backbone.embed` returns), the
    state "before" layer 1. In [-1, 1]; near 1 when the layer barely changed the residual stream.
    """
    return F.cosine_similarity(hidden.float(), previous.float(), dim=-1)


# Measures that read hidden states, not logits: `measure_confidence` dispatches them.
HIDDEN_MEASURES = ("saturation", "classifier")
CONFIDENCES = (*CONFIDENCE_MEASURES, *HIDDEN_MEASURES)


def confidence_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A logit-only measure by name (the hidden-state ones go through `measure_confidence`)."""
    if name in HIDDEN_MEASURES:
        raise ValueError(f"routing.confidence: {name} reads hidden states, not logits; this path takes only "
                         f"{', '.join(CONFIDENCE_MEASURES)}")  # fmt: skip
    if name not in CONFIDENCE_MEASURES:
        raise ValueError(f"routing.confidence: must be one of {sorted(CONFIDENCE_MEASURES)}, got {name!r}")
    return CONFIDENCE_MEASURES[name]


def needs_hidden(name: str) -> bool:
    """True for a measure that reads the exit's hidden states (saturation, classifier)."""
    return name in HIDDEN_MEASURES


def measure_confidence(
    model: Any,
    name: str,
    layer: int,
    logits: torch.Tensor,
    hidden: torch.Tensor | None = None,
    previous: torch.Tensor | None = None,
) -> torch.Tensor:
    """Any measure at exit `layer`: logit ones read `logits` (..., V); saturation reads the exit's hidden state
    and the previous layer's (..., C); classifier reads the hidden state through `model.exit_classifier`."""
    if name == "saturation":
        return saturation(hidden, previous)
    if name == "classifier":
        return model.exit_classifier(layer, hidden)
    return confidence_fn(name)(logits)


def normalize_routing(
    exit_layer: int | Sequence[int],
    routing_threshold: float | Sequence[float],
    num_layers: int | None = None,
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Turn the seeds' scalars or a cascade's lists into sorted tuples, validated.

    A single threshold with several exit layers applies to each of them.
    """
    exits = (exit_layer,) if isinstance(exit_layer, int) else tuple(int(e) for e in exit_layer)
    if isinstance(routing_threshold, (int, float)):
        thresholds = (float(routing_threshold),) * len(exits)
    else:
        thresholds = tuple(float(t) for t in routing_threshold)
    if not exits:
        raise ValueError("exit_layer: at least one exit layer is required")
    if len(thresholds) != len(exits):
        raise ValueError(
            f"routing_threshold: needs one value per exit layer ({len(exits)}), got {len(thresholds)} values"
        )
    if len(set(exits)) != len(exits):
        raise ValueError(f"exit_layer: exit layers must be distinct, got {list(exits)}")
    for t in thresholds:
        if not 0.0 <= t <= 1.0 or t != t:
            raise ValueError(f"routing_threshold: must be in [0, 1] (0 = no routing), got {t}")
    for e, t in zip(exits, thresholds):
        if e < 1:
            raise ValueError(f"exit_layer: must be >= 1, got {e}")
        # An active exit must sit below the last layer; an inactive one only inside the model.
        top = None if num_layers is None else (num_layers - 1 if t > 0 else num_layers)
        if top is not None and e > top:
            raise ValueError(f"exit_layer: must be in 1..{top} for a {num_layers}-layer model, got {e}")
    order = sorted(range(len(exits)), key=lambda i: exits[i])
    return tuple(exits[i] for i in order), tuple(thresholds[i] for i in order)


def route_from_confidences(
    confidences: Mapping[int, torch.Tensor],
    thresholds: Mapping[int, float],
    num_layers: int,
) -> torch.Tensor:
    """Exit layer of each token from precomputed confidences {layer: (...)} -> (...) long."""
    exit_at: torch.Tensor | None = None
    for layer in sorted(thresholds, reverse=True):  # deepest first, so shallower exits win
        t = thresholds[layer]
        if t <= 0 or layer not in confidences:
            continue
        conf = confidences[layer]
        if exit_at is None:
            exit_at = torch.full(conf.shape, num_layers, dtype=torch.long, device=conf.device)
        exit_at = torch.where(conf >= t, torch.full_like(exit_at, layer), exit_at)
    if exit_at is None:  # no active exit: every token runs to the last layer
        any_conf = next(iter(confidences.values()))
        exit_at = torch.full(any_conf.shape, num_layers, dtype=torch.long, device=any_conf.device)
    return exit_at


def route_by_confidence(
    exit_logits: Mapping[int, torch.Tensor],
    thresholds: Mapping[int, float],
    num_layers: int,
    confidence: str = "max_prob",
) -> torch.Tensor:
    """Exit layer of each token from the logits at each routing exit {layer: (B, T, V)} -> (B, T)."""
    measure = confidence_fn(confidence)
    if not exit_logits:
        raise ValueError("route_by_confidence: no exit logits given")
    confs = {layer: measure(logits) for layer, logits in exit_logits.items()}
    return route_from_confidences(confs, thresholds, num_layers)


def compute_cost(exit_at: torch.Tensor, num_layers: int) -> float:
    """Layers computed / total layers, averaged over tokens."""
    return exit_at.double().mean().item() / num_layers


def decayed_threshold(threshold: float, step: int, max_steps: int, decay: float) -> float:
    """CALM's decaying threshold (Schuster et al. 2022, eq. 5): clip01(0.9 λ + 0.1 exp(-τ t / N)) at output
    position t of N. Early tokens need more confidence to exit, later ones less; τ = decay sets how fast."""
    value = 0.9 * threshold + 0.1 * math.exp(-decay * step / max(max_steps, 1))
    return min(max(value, 0.0), 1.0)


ROUTING_KINDS = ("none", "confidence")
CLASSIFIER_TRAINING = ("none", "joint", "after")
CLASSIFIER_KINDS = ("linear", "norm_linear")
CALIBRATE_METRICS = ("exit_share", "compute_cost", "quality")
QUALITY_RISKS = ("disagreement", "loss_gap")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ClassifierConfig:
    """`routing.classifier`: CALM's learned exit classifier (`ease.exit_classifier`), one head per routing exit.

    Attributes:
        train: none | joint (its BCE added to the training loss, reading detached states) | after (a short stage
            after training, backbone frozen).
        kind: linear (Linear C->1) | norm_linear (LayerNorm, then Linear C->1).
        weight: joint: the BCE's weight in the loss.
        epochs: after: passes over the training data.
        lr: the classifier's learning rate; None = train.lr.
    """

    train: str = "none"
    kind: str = "norm_linear"
    weight: float = 0.1
    epochs: int = 1
    lr: float | None = None

    def __post_init__(self) -> None:
        for key, allowed in (("train", CLASSIFIER_TRAINING), ("kind", CLASSIFIER_KINDS)):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"routing.classifier.{key}: must be one of {', '.join(allowed)}, got {getattr(self, key)!r}"
                )
        if not _number(self.weight) or self.weight <= 0:
            raise ValueError(f"routing.classifier.weight: must be a finite number > 0, got {self.weight!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"routing.classifier.epochs: must be an int >= 1, got {self.epochs!r}")
        if self.lr is not None and (not _number(self.lr) or self.lr <= 0):
            raise ValueError(f"routing.classifier.lr: must be a finite number > 0 (or null: train.lr), got {self.lr!r}")


@dataclass
class CalibrateConfig:
    """`routing.calibrate`: pick the threshold τ on the validation split (`ease.calibration`), then apply it.

    Attributes:
        metric: null (off) | exit_share | compute_cost | quality (CALM's Learn-then-Test bound).
        target: exit_share / compute_cost: the value to reach.
        quality: disagreement (routed argmax != the last layer's) | loss_gap (routed NLL - last layer's NLL,
            clipped to [0, loss_clip]).
        epsilon: quality: the risk bound ε (a share for disagreement, nats for loss_gap).
        delta: quality: the bound holds with probability >= 1 - δ.
        loss_clip: loss_gap: the per-token gap is clipped to [0, loss_clip], so it is bounded (Hoeffding-Bentkus).
        grid_size: quality: τ tested on the fixed grid 1, 1-1/G, ..., 1/G, most conservative first.
    """

    metric: str | None = None
    target: float | None = None
    quality: str = "disagreement"
    epsilon: float = 0.1
    delta: float = 0.1
    loss_clip: float = 5.0
    grid_size: int = 100

    def __post_init__(self) -> None:
        if self.metric is not None and self.metric not in CALIBRATE_METRICS:
            raise ValueError(
                f"routing.calibrate.metric: must be null or one of {', '.join(CALIBRATE_METRICS)}, got {self.metric!r}"
            )
        if self.metric in ("exit_share", "compute_cost") and (
            self.target is None or not _number(self.target) or not 0 <= self.target <= 1
        ):
            raise ValueError(f"routing.calibrate.target: {self.metric} needs a target in [0, 1], got {self.target!r}")
        if self.quality not in QUALITY_RISKS:
            raise ValueError(
                f"routing.calibrate.quality: must be one of {', '.join(QUALITY_RISKS)}, got {self.quality!r}"
            )
        if not _number(self.loss_clip) or self.loss_clip <= 0:
            raise ValueError(f"routing.calibrate.loss_clip: must be a finite number > 0, got {self.loss_clip!r}")
        top = 1.0 if self.quality == "disagreement" else self.loss_clip
        if not _number(self.epsilon) or not 0 < self.epsilon < top:
            raise ValueError(
                f"routing.calibrate.epsilon: must be in (0, {top:g}) for {self.quality}, got {self.epsilon!r}"
            )
        if not _number(self.delta) or not 0 < self.delta < 1:
            raise ValueError(f"routing.calibrate.delta: must be in (0, 1), got {self.delta!r}")
        if isinstance(self.grid_size, bool) or not isinstance(self.grid_size, int) or self.grid_size < 2:
            raise ValueError(f"routing.calibrate.grid_size: must be an int >= 2, got {self.grid_size!r}")


DEFAULT_ANALYSIS_THRESHOLDS = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]


@dataclass
class RoutingConfig:
    """The `routing` group: where tokens exit at inference, and the threshold curve every run records.

    Attributes:
        kind: "none" (every token runs every layer) or "confidence".
        exit_layer: the exit layer, or a list of them for a cascade.
        threshold: confidence needed to exit, in (0, 1]; one per exit layer, or one for all.
        confidence: max_prob | top2_margin | neg_entropy | saturation | classifier (the last two: CALM's).
        analysis_thresholds: the thresholds scored from the final evaluation pass (seed 003's table).
        threshold_decay: CALM's decaying threshold while decoding (`decayed_threshold`, τ); None = fixed.
        classifier: CALM's learned exit classifier (`ClassifierConfig`).
        calibrate: threshold calibration on the validation split (`CalibrateConfig`).
    """

    kind: str = "none"
    exit_layer: Any = 1
    threshold: Any = 0.0
    confidence: str = "max_prob"
    analysis_thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_ANALYSIS_THRESHOLDS))
    threshold_decay: float | None = None  # decoding only: CALM's decaying threshold with τ = this (>= 0); None = off
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)

    def __post_init__(self) -> None:
        if isinstance(self.classifier, Mapping):  # a config saved in a checkpoint is plain data
            self.classifier = ClassifierConfig(**self.classifier)
        if isinstance(self.calibrate, Mapping):
            self.calibrate = CalibrateConfig(**self.calibrate)
        if self.kind not in ROUTING_KINDS:
            raise ValueError(f"routing.kind: must be one of {', '.join(ROUTING_KINDS)}, got {self.kind!r}")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"routing.confidence: must be one of {', '.join(CONFIDENCES)}, got {self.confidence!r}")
        if self.calibrate.metric is not None and self.kind != "confidence":
            raise ValueError("routing.calibrate.metric: calibration sets the exits' threshold; use routing=confidence")
        if self.kind == "confidence" and not isinstance(self.threshold, list) and self.threshold == 0:
            raise ValueError(
                "routing.threshold: must be in (0, 1] with routing=confidence (use routing=none for no exit)"
            )
        try:
            normalize_routing(*self.settings())
        except ValueError as err:
            message = str(err)
            for name, key in (("routing_threshold", "routing.threshold"), ("exit_layer", "routing.exit_layer")):
                if message.startswith(name + ":"):
                    message = key + message[len(name) :]
            raise ValueError(message) from None
        for t in self.analysis_thresholds:
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"routing.analysis_thresholds: each must be in [0, 1], got {t}")
        decay = self.threshold_decay
        if decay is not None and (isinstance(decay, bool) or not math.isfinite(decay) or decay < 0):
            raise ValueError(f"routing.threshold_decay: must be a finite number >= 0 (CALM's τ), got {decay!r}")

    def settings(self) -> tuple[Any, Any]:
        """(exit_layer, threshold) as the library takes them; routing=none gives threshold 0."""
        return self.exit_layer, self.threshold if self.kind == "confidence" else 0.0
