"""Token-routed training (seed 000's TokenRoutedTransformer): each token trains only the route it takes.

A token's route is decided in the same forward pass that computes its loss: its confidence at the exit
layer e (the routing measure, max softmax by default) is compared with the routing threshold, on the current
weights, in training mode, and without gradient (the decision is a hard, detached choice). A confident token
contributes CE(logits_e) to the loss and nothing at the last layer; any other token contributes
CE(logits_L) and nothing at layer e. The loss is the mean over all tokens of the batch, so each layer's
effective weight is the share of tokens on its route (recorded per epoch as `weights`). No α is needed.

Gradients still reach layers e+1..L from confident tokens' positions, but only as attention context for
later tokens on the deep route: the final-layer logits of a confident token receive exactly zero gradient,
and so do the exit logits of an unconfident one. This is the counted-mode inference the model is evaluated
with (every layer runs for every token; the route picks which logits score it).

Collapse guard. At initialisation max softmax is about 1/V, so no token reaches a threshold like 0.7: with
the rule alone the exit layer would never get a loss, never become confident, and the model would stay a
standard LM (the opposite collapse, every token confident, starves the last layer). `min_route_fraction` f
keeps both routes alive: in every batch of N tokens each route gets at least m = ceil(f·N) tokens. If fewer
than m tokens are confident, the m most confident take the exit route; if fewer than m are unconfident, the
m least confident take the deep route. The guard acts only during training (inference routes by the
threshold alone) and how often it fires is recorded. f = 0 turns it off; f must be at most 0.5.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ease.checkpoint import restore_training_state, training_state
from ease.config import TrainingConfig
from ease.evaluation import Batch
from ease.model import EarlyExitTransformer
from ease.routing import confidence_fn
from ease.trainer import EarlyStoppingState, EpochResult, Trainer


def check_min_route_fraction(value: float) -> float:
    """Validate the guard's share; returns it as a float."""
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
    """Exit where confidence >= threshold, then let each route keep at least ceil(f·N) tokens (module docstring).

    confidence: (N,) detached confidences at the exit layer.
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
    model: EarlyExitTransformer,
    x: torch.Tensor,
    y: torch.Tensor,
    exit_layer: int,
    threshold: float,
    min_route_fraction: float = 0.0,
    confidence: str = "max_prob",
) -> TokenRoutedLoss:
    """Each token's CE at its own route only; the head runs on exit positions at e and deep positions at L."""
    L = model.num_layers
    hidden = model.hidden_states(x, [exit_layer, L])
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


class TokenRoutedTransformer(EarlyExitTransformer):
    """An `EarlyExitTransformer` trained token-routed (seed 000): one exit, one threshold, routed loss.

    At inference it is an ordinary early-exit model (`routed_forward`, `Trainer.evaluate`); checkpoints load
    back as `EarlyExitTransformer`. Train it with `TokenRoutedTrainer`.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        num_layers: int,
        num_heads: int = 4,
        exit_layer: int = 1,
        routing_threshold: float = 0.7,
        min_route_fraction: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(vocab_size, dim, num_layers, num_heads, exit_layer, routing_threshold, **kwargs)
        check_single_route(self.exit_layers, self.routing_thresholds)
        self.min_route_fraction = check_min_route_fraction(min_route_fraction)

    def token_routed_loss(self, x: torch.Tensor, y: torch.Tensor) -> TokenRoutedLoss:
        """The routed loss of a batch with this model's exit, threshold, guard and confidence measure."""
        return token_routed_loss(
            self, x, y, self.exit_layer, self.routing_threshold, self.min_route_fraction, self.confidence
        )


def check_single_route(exit_layers: Sequence[int], thresholds: Sequence[float]) -> None:
    """Token-routed training has two routes: one exit layer with a threshold in (0, 1], and the last layer."""
    if len(exit_layers) != 1:
        raise ValueError(f"exit_layer: token-routed training takes one exit layer, got {list(exit_layers)}")
    if not 0.0 < thresholds[0] <= 1.0:
        raise ValueError(f"routing_threshold: token-routed training needs a threshold in (0, 1], got {thresholds[0]}")


@dataclass
class RouteStats:
    """Route counts of one epoch."""

    tokens: int = 0
    exit_tokens: int = 0
    forced_exit: int = 0
    forced_deep: int = 0
    guarded_batches: int = 0
    batches: int = 0
    confidence_sum: float = 0.0
    exit_nll_sum: float = 0.0
    final_nll_sum: float = 0.0

    def add(self, result: TokenRoutedLoss) -> None:
        d = result.decision
        self.tokens += d.exit_mask.numel()
        self.exit_tokens += int(d.exit_mask.sum().item())
        self.forced_exit += d.forced_exit
        self.forced_deep += d.forced_deep
        self.guarded_batches += int(d.forced_exit > 0 or d.forced_deep > 0)
        self.batches += 1
        self.confidence_sum += result.confidence_sum
        self.exit_nll_sum += result.exit_nll_sum
        self.final_nll_sum += result.final_nll_sum

    def summary(self) -> dict[str, float | int | None]:
        n, exits = max(self.tokens, 1), self.exit_tokens
        deep = self.tokens - exits
        return {
            "exit_fraction": exits / n,
            "deep_fraction": deep / n,
            "forced_exit_fraction": self.forced_exit / n,
            "forced_deep_fraction": self.forced_deep / n,
            "guarded_batches": self.guarded_batches,
            "batches": self.batches,
            "mean_confidence": self.confidence_sum / n,
            "exit_route_loss": self.exit_nll_sum / exits if exits else None,
            "deep_route_loss": self.final_nll_sum / deep if deep else None,
        }


class TokenRoutedTrainer(Trainer):
    """`Trainer` whose training loss is `token_routed_loss`; evaluation and early stopping are the Trainer's.

    The config needs one exit layer with a threshold in (0, 1]; its layer_weights only choose which exits
    `evaluate` reports (give the exit and the last layer). Validation `loss` is the routed loss (each token
    scored at its route by the threshold alone, without the guard). Each epoch's route statistics are in
    `route_history` and in the history rows under "route"; the row's "weights" are the route shares.
    """

    def __init__(
        self,
        config: TrainingConfig,
        vocab_size: int | None = None,
        device: str | torch.device = "cpu",
        grad_clip: float | None = 1.0,
        min_route_fraction: float = 0.05,
        total_epochs: int | None = None,
        progress: bool = False,
    ) -> None:
        check_single_route(config.exit_layers, config.routing_thresholds)
        if config.alpha_schedule is not None:
            raise ValueError("alpha_schedule: token-routed training has no α; remove the schedule")
        super().__init__(config, vocab_size, device, grad_clip, total_epochs, progress)
        self.min_route_fraction = check_min_route_fraction(min_route_fraction)
        self.route_history: list[dict[str, Any]] = []
        self._stats = RouteStats()

    def compute_loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: dict[int, float] | None = None
    ) -> torch.Tensor:
        """The token-routed loss (`weights` is ignored: the routes decide which layer scores a token)."""
        result = token_routed_loss(
            model, x, y, self.config.exit_layers[0], self.config.routing_thresholds[0], self.min_route_fraction,
            self.config.confidence,
        )  # fmt: skip
        self._stats.add(result)
        return result.loss

    def train_epoch(
        self,
        model: nn.Module,
        batches: Iterable[Batch],
        optimizer: torch.optim.Optimizer,
        epoch: int | None = None,
        total_epochs: int | None = None,
    ) -> EpochResult:
        self._stats = RouteStats()
        result = super().train_epoch(model, batches, optimizer, epoch, total_epochs)
        stats = self._stats.summary()
        self.route_history.append(stats)
        shares = {self.config.exit_layers[0]: stats["exit_fraction"], model.num_layers: stats["deep_fraction"]}
        self.weight_history[-1] = shares
        return EpochResult(result.loss, shares)

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], *args: Any, **kwargs: Any) -> dict[str, Any]:
        result = super().evaluate(model, batches, *args, **kwargs)
        result["loss"] = result["routed_loss"]  # the token-routed objective on these batches
        return result

    def train_with_early_stopping(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        user_callback = kwargs.pop("on_epoch_end", None)

        def on_epoch_end(epoch: int, state: EarlyStoppingState) -> None:
            state.history[-1]["route"] = self.route_history[-1]
            if user_callback is not None:
                user_callback(epoch, state)

        return super().train_with_early_stopping(*args, on_epoch_end=on_epoch_end, **kwargs)

    def training_state(
        self, optimizer: torch.optim.Optimizer, stopping: EarlyStoppingState, completed: bool
    ) -> dict[str, Any]:
        """What a resume needs (`ease.checkpoint.training_state`) plus every epoch's route statistics."""
        state = training_state(self, optimizer, stopping, completed)
        return {**state, "strategy": "token_routed", "route_history": list(self.route_history)}

    def restore_training_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> EarlyStoppingState:
        """Put optimizer, RNGs, epoch and route history back as `training_state` found them (weights aside).

        Pass the returned state to `train_with_early_stopping(state=...)` to carry on.
        """
        if not isinstance(state, dict) or state.get("strategy") != "token_routed":
            raise ValueError("resume: the checkpoint holds no token-routed training state (saved by another strategy?)")
        stopping = restore_training_state(state, self, optimizer)
        self.route_history = list(state["route_history"])
        return stopping


def token_routed_config(
    num_layers: int,
    exit_layer: int = 1,
    routing_threshold: float = 0.7,
    layer_lr_scales: dict[int, float] | None = None,
    confidence: str = "max_prob",
    **kwargs: Any,
) -> TrainingConfig:
    """A TrainingConfig for `TokenRoutedTrainer`: routing (exit_layer, threshold), exits reported at e and L."""
    config = TrainingConfig(
        layer_weights={exit_layer: 1.0, num_layers: 1.0},
        exit_layer=exit_layer,
        routing_threshold=routing_threshold,
        layer_lr_scales=layer_lr_scales,
        confidence=confidence,
        **kwargs,
    )
    config.check_model(num_layers)
    check_single_route(config.exit_layers, config.routing_thresholds)
    return config
