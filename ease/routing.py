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


def confidence_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in CONFIDENCE_MEASURES:
        raise ValueError(f"routing.confidence: must be one of {sorted(CONFIDENCE_MEASURES)}, got {name!r}")
    return CONFIDENCE_MEASURES[name]


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
DEFAULT_ANALYSIS_THRESHOLDS = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]


@dataclass
class RoutingConfig:
    """The `routing` group: where tokens exit at inference, and the threshold curve every run records.

    Attributes:
        kind: "none" (every token runs every layer) or "confidence".
        exit_layer: the exit layer, or a list of them for a cascade.
        threshold: confidence needed to exit, in (0, 1]; one per exit layer, or one for all.
        confidence: max_prob | top2_margin | neg_entropy.
        analysis_thresholds: the thresholds scored from the final evaluation pass (seed 003's table).
        threshold_decay: CALM's decaying threshold while decoding (`decayed_threshold`, τ); None = fixed.
    """

    kind: str = "none"
    exit_layer: Any = 1
    threshold: Any = 0.0
    confidence: str = "max_prob"
    analysis_thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_ANALYSIS_THRESHOLDS))
    threshold_decay: float | None = None  # decoding only: CALM's decaying threshold with τ = this (>= 0); None = off

    def __post_init__(self) -> None:
        if self.kind not in ROUTING_KINDS:
            raise ValueError(f"routing.kind: must be one of {', '.join(ROUTING_KINDS)}, got {self.kind!r}")
        if self.confidence not in CONFIDENCE_MEASURES:
            raise ValueError(
                f"routing.confidence: must be one of {sorted(CONFIDENCE_MEASURES)}, got {self.confidence!r}"
            )
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
