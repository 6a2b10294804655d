"""Losses: the layer-weighting schemes, the weighted exit loss, the token-routed loss and the hard-token loss.

Each is a small pure function of a backbone (`ease.model.backbone.Backbone`) and a batch; statistics a
caller wants to keep (route shares, per-layer losses) are returned as values, never kept as state.

Layer-weighting schemes map the number of layers to {layer: weight} (1-indexed), in the manner of
torchtune's early-exit loss scales. They are not normalised unless they say so: the seeds' setting B
(α on L1, 1.0 on L2, 1-α on L3) sums to 2 on purpose.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ease.curriculum import CURRICULA, ExitCurriculum
from ease.model.backbone import Backbone, LayerFn, hidden_states, run_layers
from ease.routing import confidence_fn

# --- layer-weighting schemes ------------------------------------------------------------------------------


def final_only(num_layers: int) -> dict[int, float]:
    """Standard LM: the last layer alone."""
    return {layer: float(layer == num_layers) for layer in range(1, num_layers + 1)}


def uniform(num_layers: int) -> dict[int, float]:
    """Deep supervision (Lee et al., 2015): 1/L on every layer."""
    return {layer: 1.0 / num_layers for layer in range(1, num_layers + 1)}


def asymmetric(num_layers: int, alpha: float, shallow: int = 1, middle: float = 0.0) -> dict[int, float]:
    """α on the shallow exit, 1-α on the last layer, `middle` on every layer strictly between them (seed 003).

    Layers below the shallow exit get 0: they have no exit of their own.
    """
    weights = {layer: (middle if shallow < layer < num_layers else 0.0) for layer in range(1, num_layers + 1)}
    weights[shallow] = alpha
    weights[num_layers] = 1.0 - alpha
    return weights


def early_exit_scales(raw: dict[int, float], num_layers: int, e_scale: float = 1.0) -> dict[int, float]:
    """LayerSkip's scaling of raw per-exit scales: every early exit (layer < L) times `e_scale`, the last layer
    kept, then normalised to sum 1; layers not in `raw` get 0 (torchtune's early-exit loss scales)."""
    scaled = {layer: value * (e_scale if layer < num_layers else 1.0) for layer, value in raw.items()}
    total = sum(scaled.values())
    return {layer: scaled.get(layer, 0.0) / total for layer in range(1, num_layers + 1)}


def _exits(num_layers: int, layers: Iterable[int] | None) -> list[int]:
    """The exits that get loss, ascending (default: every layer)."""
    return sorted(set(range(1, num_layers + 1) if layers is None else layers))


def linear_l(num_layers: int, e_scale: float = 1.0, layers: Iterable[int] | None = None) -> dict[int, float]:
    """Weight proportional to depth l, normalised to sum 1 over `layers` (default all; LayerSkip's `l` scale)."""
    return early_exit_scales({layer: float(layer) for layer in _exits(num_layers, layers)}, num_layers, e_scale)


def sum_l(num_layers: int, e_scale: float = 1.0, layers: Iterable[int] | None = None) -> dict[int, float]:
    """Weight proportional to the running sum of the depths of the exits up to l (1, 1+2, 1+2+3, ... with every
    exit on; LayerSkip's paper scale), normalised to sum 1."""
    exits = _exits(num_layers, layers)
    running = [float(sum(exits[: k + 1])) for k in range(len(exits))]
    return early_exit_scales(dict(zip(exits, running)), num_layers, e_scale)


def sqrt_l(num_layers: int, e_scale: float = 1.0, layers: Iterable[int] | None = None) -> dict[int, float]:
    """Weight proportional to sqrt(depth), normalised to sum 1."""
    return early_exit_scales({layer: math.sqrt(layer) for layer in _exits(num_layers, layers)}, num_layers, e_scale)


def inv_l(num_layers: int, e_scale: float = 1.0, layers: Iterable[int] | None = None) -> dict[int, float]:
    """Weight proportional to 1/depth (the shallow exits weigh most), normalised to sum 1."""
    return early_exit_scales({layer: 1.0 / layer for layer in _exits(num_layers, layers)}, num_layers, e_scale)


def inv_sqrt_l(num_layers: int, e_scale: float = 1.0, layers: Iterable[int] | None = None) -> dict[int, float]:
    """Weight proportional to 1/sqrt(depth), normalised to sum 1."""
    exits = _exits(num_layers, layers)
    return early_exit_scales({layer: 1.0 / math.sqrt(layer) for layer in exits}, num_layers, e_scale)


# LayerSkip's early-exit scales (`loss_weights.kind`): each normalised over the exits that get loss, so a
# curriculum (ease.curriculum) can switch exits on and off and the weights still sum to 1.
EARLY_EXIT_SCALES = {"linear_l": linear_l, "sum_l": sum_l, "sqrt_l": sqrt_l, "inv_l": inv_l, "inv_sqrt_l": inv_sqrt_l}

LOSS_WEIGHT_KINDS = ("final_only", "uniform", "asymmetric", "shallow_deep", "with_middle", "custom", *EARLY_EXIT_SCALES)
_ALPHA_KINDS = ("asymmetric", "shallow_deep", "with_middle")


@dataclass
class LossWeightsConfig:
    """The `loss_weights` group: which scheme puts how much loss on which layer.

    Attributes:
        kind: final_only | uniform | asymmetric | shallow_deep (= asymmetric) | with_middle | custom, or one of
            LayerSkip's early-exit scales linear_l | sum_l | sqrt_l | inv_l | inv_sqrt_l (normalised to sum 1).
        alpha: weight of the shallow exit (asymmetric, shallow_deep, with_middle); the last layer gets 1-α.
        middle: weight of every layer strictly between the shallow exit and the last (with_middle).
        shallow_layer: where α goes; None = the first routing exit layer.
        weights: custom: one weight per layer, shallowest first.
        e_scale: the early-exit scales: every layer below the last times e_scale before normalising.
        curriculum: none | rotational | gradual: which exits get loss at each optimizer step (ease.curriculum;
            early-exit scales only).
        rotation_period: rotational: R, every R-th layer active, the pattern rolling one layer per step.
        gradual_fraction: gradual: the share of the run's steps after which every exit is on.
    """

    kind: str = "final_only"
    alpha: float = 0.7
    middle: float = 1.0
    shallow_layer: int | None = None
    weights: list[float] = field(default_factory=list)
    e_scale: float = 1.0
    curriculum: str = "none"
    rotation_period: int = 2
    gradual_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in LOSS_WEIGHT_KINDS:
            raise ValueError(f"loss_weights.kind: must be one of {', '.join(LOSS_WEIGHT_KINDS)}, got {self.kind!r}")
        if self.kind in _ALPHA_KINDS and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"loss_weights.alpha: must be in [0, 1], got {self.alpha}")
        if not (math.isfinite(self.middle) and self.middle >= 0):
            raise ValueError(f"loss_weights.middle: must be a finite number >= 0, got {self.middle}")
        if self.shallow_layer is not None and self.shallow_layer < 1:
            raise ValueError(f"loss_weights.shallow_layer: layers are 1-indexed (>= 1), got {self.shallow_layer}")
        self._check_early_exit()

    def _check_early_exit(self) -> None:
        scales = ", ".join(EARLY_EXIT_SCALES)
        if isinstance(self.e_scale, bool) or not (math.isfinite(self.e_scale) and self.e_scale > 0):
            raise ValueError(f"loss_weights.e_scale: must be a finite number > 0, got {self.e_scale}")
        if self.e_scale != 1.0 and self.kind not in EARLY_EXIT_SCALES:
            raise ValueError(f"loss_weights.e_scale: applies to the kinds {scales} only, got kind {self.kind!r}")
        if self.curriculum not in CURRICULA:
            raise ValueError(f"loss_weights.curriculum: must be one of {', '.join(CURRICULA)}, got {self.curriculum!r}")
        if self.curriculum != "none" and self.kind not in EARLY_EXIT_SCALES:
            raise ValueError(f"loss_weights.curriculum: needs one of the kinds {scales}, got kind {self.kind!r}")
        period = self.rotation_period
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"loss_weights.rotation_period: must be an int >= 1, got {period!r}")
        if not (math.isfinite(self.gradual_fraction) and 0 < self.gradual_fraction <= 1):
            raise ValueError(f"loss_weights.gradual_fraction: must be in (0, 1], got {self.gradual_fraction}")

    @property
    def moves_alpha(self) -> bool:
        """True for the schemes an α schedule can move."""
        return self.kind in _ALPHA_KINDS

    def curriculum_for(self, num_layers: int) -> ExitCurriculum | None:
        """The exit curriculum (None for curriculum=none): the scale re-normalised over each step's exits."""
        if self.curriculum == "none":
            return None
        scale, e_scale = EARLY_EXIT_SCALES[self.kind], self.e_scale

        def scheme(active: frozenset[int]) -> dict[int, float]:
            return scale(num_layers, e_scale, active)

        return ExitCurriculum(self.curriculum, self.rotation_period, self.gradual_fraction, scheme)

    def layer_weights(self, num_layers: int, shallow: int) -> dict[int, float]:
        """{layer: weight} for an L-layer model; α goes on `shallow_layer`, else on `shallow`."""
        shallow = self.shallow_layer or shallow
        if self.kind in _ALPHA_KINDS and not 1 <= shallow < num_layers:
            raise ValueError(f"loss_weights.shallow_layer: must be in 1..{num_layers - 1}, got {shallow}")
        if self.kind == "final_only":
            return final_only(num_layers)
        if self.kind == "uniform":
            return uniform(num_layers)
        if self.kind in ("asymmetric", "shallow_deep"):
            return asymmetric(num_layers, self.alpha, shallow)
        if self.kind == "with_middle":
            return asymmetric(num_layers, self.alpha, shallow, middle=self.middle)
        if self.kind in EARLY_EXIT_SCALES:
            return EARLY_EXIT_SCALES[self.kind](num_layers, self.e_scale)
        if len(self.weights) != num_layers:
            raise ValueError(
                f"loss_weights.weights: custom needs one weight per layer ({num_layers}), got {list(self.weights)}"
            )
        return {i: float(v) for i, v in enumerate(self.weights, start=1)}


# --- the weighted exit loss -------------------------------------------------------------------------------


def weighted_exit_loss(
    model: Backbone,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: dict[int, float],
    layer_fn: LayerFn | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Σ_l w_l · CE(logits_l, y) over the layers with w_l > 0, and each of those layers' CE.

    The blocks run once up to the deepest weighted layer; the head runs once, on the stacked states of the
    weighted layers only. `layer_fn(i, h)` runs layer i instead of `model.layer` (layer dropout).
    """
    loss, per_layer, _, _ = weighted_exit_terms(model, x, y, weights, layer_fn)
    return loss, per_layer


def weighted_exit_terms(
    model: Backbone, x: torch.Tensor, y: torch.Tensor, weights: dict[int, float], layer_fn: LayerFn | None = None
) -> tuple[torch.Tensor, dict[int, torch.Tensor], list[int], torch.Tensor]:
    """`weighted_exit_loss` and what it computed on the way: the weighted layers (ascending) and their logits
    (k, B, T, V), for objectives that add terms on the same exits (`ease.distillation`)."""
    layers = sorted(layer for layer, w in weights.items() if w > 0)
    hidden = hidden_states(model, x, layers, layer_fn)  # {layer: (B, T, C)}
    k = len(layers)
    # (k, B, T, C); one exit (the standard LM) as a view: no copy of the states in either direction
    h = hidden[layers[0]].unsqueeze(0) if k == 1 else torch.stack([hidden[layer] for layer in layers])
    logits = model.unembed(h)  # (k, B, T, V): one head call for every weighted exit
    V = logits.shape[-1]
    targets = y.reshape(-1) if k == 1 else y.reshape(-1).repeat(k)
    ce = F.cross_entropy(logits.reshape(-1, V).float(), targets, reduction="none")
    per_layer = ce.view(k, -1).mean(dim=1)  # (k,)
    w = torch.tensor([weights[layer] for layer in layers], dtype=per_layer.dtype, device=per_layer.device)
    return (w * per_layer).sum(), dict(zip(layers, per_layer)), layers, logits


# --- the token-routed loss (seed 000) ---------------------------------------------------------------------


def check_min_route_fraction(value: float) -> float:
    """Validate the collapse guard's share; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 0.5:
        raise ValueError(f"min_route_fraction: must be in [0, 0.5], got {value!r}")
    return float(value)


@dataclass
class RouteDecision:
    """The route of every token of one batch."""

    exit_mask: torch.Tensor  # (N,) bool: True = exit-layer route
    forced_exit: int  # tokens sent to the exit by the guard despite a confidence below the threshold
    forced_deep: int  # tokens sent deep by the guard despite a confidence at or above the threshold


def route_tokens(confidence: torch.Tensor, threshold: float, min_route_fraction: float = 0.0) -> RouteDecision:
    """Exit where confidence >= threshold, then let each route keep at least ceil(f·N) tokens.

    confidence: (N,) detached confidences at the exit layer. See `ease.strategies.token_routed` for why the
    guard exists.
    """
    conf = confidence.reshape(-1)
    n = conf.numel()
    exit_mask = conf >= threshold
    m = math.ceil(min_route_fraction * n) if min_route_fraction > 0 else 0
    num_exit = int(exit_mask.sum().item())
    forced_exit = forced_deep = 0
    if m and num_exit < m:
        exit_mask = torch.zeros_like(exit_mask)
        exit_mask[conf.topk(m).indices] = True
        forced_exit = m - num_exit
    elif m and n - num_exit < m:
        exit_mask = torch.ones_like(exit_mask)
        exit_mask[conf.topk(m, largest=False).indices] = False
        forced_deep = m - (n - num_exit)
    return RouteDecision(exit_mask, forced_exit, forced_deep)


@dataclass
class TokenRoutedLoss:
    """The routed loss of one batch and what went into it."""

    loss: torch.Tensor  # scalar: (Σ_exit CE_e + Σ_deep CE_L) / N
    decision: RouteDecision
    exit_nll_sum: float
    final_nll_sum: float
    confidence_sum: float


def token_routed_loss(
    model: Backbone,
    x: torch.Tensor,
    y: torch.Tensor,
    exit_layer: int,
    threshold: float,
    min_route_fraction: float = 0.0,
    confidence: str = "max_prob",
) -> TokenRoutedLoss:
    """Each token's CE at its own route only; the head runs on exit positions at e and deep positions at L.

    The route is decided in the same pass, from the detached exit confidence of the current weights.
    """
    L = model.num_layers
    hidden = hidden_states(model, x, [exit_layer, L])
    target = y.reshape(-1)  # (N,)
    h_exit = hidden[exit_layer].reshape(target.numel(), -1)  # (N, C)
    h_final = hidden[L].reshape(target.numel(), -1)
    exit_logits = model.unembed(h_exit).float()  # (N, V): every token, to decide its route
    conf = confidence_fn(confidence)(exit_logits.detach())  # (N,)
    decision = route_tokens(conf, threshold, min_route_fraction)
    on_exit, deep = decision.exit_mask, ~decision.exit_mask
    exit_nll = F.cross_entropy(exit_logits[on_exit], target[on_exit], reduction="sum")
    final_nll = F.cross_entropy(model.unembed(h_final[deep]).float(), target[deep], reduction="sum")
    loss = (exit_nll + final_nll) / target.numel()
    return TokenRoutedLoss(loss, decision, exit_nll.item(), final_nll.item(), conf.sum().item())


# --- the hard-token loss (ASHEM phase 2, seed 002) --------------------------------------------------------


def upper_layer_logits(
    model: Backbone, hidden: torch.Tensor, mask: torch.Tensor, num_lower_layers: int, top: int | None = None
) -> torch.Tensor:
    """Run layers k+1..top (default L) on cached layer-k states (every position, for context); the logits at
    the masked positions only. hidden (B, T, C), mask (B, T) -> (n_masked, V)."""
    top = model.num_layers if top is None else top
    h = run_layers(model, hidden, num_lower_layers, top) if top > num_lower_layers else hidden  # (B, T, C)
    return model.unembed(h[mask])  # (n, V): the head only where the loss is


def hard_token_loss(
    model: Backbone, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, num_lower_layers: int
) -> torch.Tensor:
    """Mean CE of the last layer on the hard (masked) tokens, from cached layer-k states."""
    logits = upper_layer_logits(model, hidden, mask, num_lower_layers)
    return F.cross_entropy(logits.float(), targets[mask])
