"""Token-routed training (seed 000's TokenRoutedTransformer): each token trains only the route it takes.

A token's route is decided in the same forward pass that computes its loss: its confidence at the exit
layer e (the routing measure, max softmax by default) is compared with the routing threshold, on the current
weights, in training mode, and without gradient (the decision is a hard, detached choice). A confident token
contributes CE(logits_e) to the loss and nothing at the last layer; any other token contributes
CE(logits_L) and nothing at layer e. The loss is the mean over all tokens of the batch, so each layer's
effective weight is the share of tokens on its route (recorded per epoch as `weights`). No α is needed.
The loss itself is `ease.losses.token_routed_loss`.

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ease.config import TrainingConfig
from ease.evaluation import TokenStats
from ease.losses import TokenRoutedLoss, check_min_route_fraction, token_routed_loss
from ease.model.backbone import Backbone
from ease.model.transformer import EarlyExitTransformer
from ease.training.trainer import BatchLoss, Trainer


def check_single_route(exit_layers: Sequence[int], thresholds: Sequence[float]) -> None:
    """Token-routed training has two routes: one exit layer with a threshold in (0, 1], and the last layer."""
    if len(exit_layers) != 1:
        raise ValueError(f"exit_layer: token-routed training takes one exit layer, got {list(exit_layers)}")
    if not 0.0 < thresholds[0] <= 1.0:
        raise ValueError(f"routing_threshold: token-routed training needs a threshold in (0, 1], got {thresholds[0]}")


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


@dataclass
class RouteStats:
    """Route counts of one epoch, summed from the batches' `TokenRoutedLoss` reports."""

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
    scored at its route by the threshold alone, without the guard). Each epoch's route statistics are the
    `stats` of its `EpochResult` and the "route" entry of its history row; the row's "weights" are the
    route shares.
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
        **steps: Any,
    ) -> None:
        """`steps`: Trainer's grad_accum, precision, lr_schedule and dist."""
        check_single_route(config.exit_layers, config.routing_thresholds)
        if config.alpha_schedule is not None:
            raise ValueError("alpha_schedule: token-routed training has no α; remove the schedule")
        super().__init__(config, vocab_size, device, grad_clip, total_epochs, progress, **steps)
        self.min_route_fraction = check_min_route_fraction(min_route_fraction)

    def batch_loss(self, model: Backbone, x: torch.Tensor, y: torch.Tensor, weights: dict[int, float]) -> BatchLoss:
        """The token-routed loss (`weights` is ignored: the routes decide which layer scores a token)."""
        result = token_routed_loss(
            model, x, y, self.config.exit_layers[0], self.config.routing_thresholds[0], self.min_route_fraction,
            self.config.confidence,
        )  # fmt: skip
        return BatchLoss(result.loss, result)

    def epoch_summary(self, reports: list[TokenRoutedLoss], model: Backbone) -> dict[str, Any]:
        stats = RouteStats()
        for report in reports:
            stats.add(report)
        return stats.summary()

    def trained_weights(self, weights: dict[int, float], summary: dict[str, Any] | None, model: Backbone) -> dict:
        """The share of tokens on each route: the effective weight of the exit and of the last layer."""
        assert summary is not None
        return {self.config.exit_layers[0]: summary["exit_fraction"], model.num_layers: summary["deep_fraction"]}

    def objective_loss(self, stats: TokenStats, routed: dict[str, Any], num_layers: int) -> float:
        """The token-routed objective on evaluated batches: the routed loss."""
        return routed["routed_loss"]


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
