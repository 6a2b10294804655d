"""Trainer: weighted multi-exit loss, per-layer learning rates, routed evaluation, early stopping.

It speaks to the model only through the backbone protocol (`ease.model.backbone`), so the native model and
any other backbone train the same way. `UniversalTrainer` is the same class under seed 000's name.

A subclass changes the training objective by overriding `batch_loss` (token-routed training does); what
a batch's loss reports besides the loss itself is returned as a value and summarised per epoch by
`epoch_summary`, never kept on the trainer.
"""

import copy
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ease.config import TrainingConfig
from ease.evaluation import Batch, TokenStats, collect_token_stats, threshold_rows
from ease.losses import weighted_exit_loss
from ease.model.backbone import Backbone
from ease.routing import normalize_routing
from ease.schedule import apply_alpha
from ease.stop import check_stop
from ease.training.config import MONITORS
from ease.training.loop import EpochCallback, EpochOutcome, Validation, fit
from ease.training.state import EarlyStoppingState, rng_state, set_rng_state

log = logging.getLogger("ease.trainer")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; training stops before the bad step is applied."""


class EpochResult(tuple):
    """What `train_epoch` returns: unpacks as `loss, weights` (seed 000) and converts with float() (seed 004).

    Also carries `tokens` (target tokens trained on) and `stats`, the epoch's summary of what the batch
    losses reported (`Trainer.epoch_summary`), if any.
    """

    loss: float
    weights: dict[int, float]
    tokens: int
    stats: dict[str, Any] | None

    def __new__(
        cls, loss: float, weights: dict[int, float], tokens: int = 0, stats: dict[str, Any] | None = None
    ) -> "EpochResult":
        result = super().__new__(cls, (loss, weights))
        result.loss, result.weights, result.tokens, result.stats = loss, weights, tokens, stats
        return result

    def __float__(self) -> float:
        return float(self.loss)

    def __format__(self, spec: str) -> str:
        return format(self.loss, spec)


class BatchLoss(NamedTuple):
    """One batch's training loss and whatever the objective reports besides it (None for the weighted loss)."""

    loss: torch.Tensor
    report: Any = None


def optimizer_step(
    loss: torch.Tensor, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer, grad_clip: float | None
) -> None:
    """Backward, clip the gradient norm of `params` to `grad_clip` (None or 0: no clipping), step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) at {where}")


class Trainer:
    """Trains and evaluates an early-exit backbone as a `TrainingConfig` says."""

    def __init__(
        self,
        config: TrainingConfig,
        vocab_size: int | None = None,
        device: str | torch.device = "cpu",
        grad_clip: float | None = 1.0,
        total_epochs: int | None = None,
        progress: bool = False,
    ) -> None:
        if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip >= 0):
            raise ValueError(
                f"train.grad_clip: must be a finite number >= 0 (0 or null = no clipping), got {grad_clip}"
            )
        self.config = config
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.grad_clip = grad_clip
        self.total_epochs = total_epochs
        self.progress = progress
        self.epoch = 0  # epochs trained so far by train_epoch; drives the α schedule and the data order
        self.weight_history: list[dict[int, float]] = []  # the weights each trained epoch used

    # --- loss -------------------------------------------------------------------------------------------

    def _check(self, model: Backbone) -> None:
        self.config.check_model(model.num_layers)
        if self.vocab_size is not None and self.vocab_size != model.vocab_size:
            raise ValueError(f"vocab_size: trainer has {self.vocab_size}, model has {model.vocab_size}")

    def epoch_weights(
        self, num_layers: int, epoch: int | None = None, total_epochs: int | None = None
    ) -> dict[int, float]:
        """Layer weights in force at `epoch` (0-based), with the α schedule applied if there is one."""
        weights = self.config.weights_for(num_layers)
        schedule = self.config.alpha_schedule
        if schedule is None:
            return weights
        epoch = self.epoch if epoch is None else epoch
        total = total_epochs or self.total_epochs
        if total is None and not schedule.is_constant:
            raise ValueError(
                f"alpha_schedule: kind {schedule.kind!r} needs the number of epochs; pass total_epochs to Trainer"
            )
        alpha = schedule.at_epoch(epoch, total or 1)
        return apply_alpha(weights, alpha, self.config.shallow_layer, num_layers)

    @property
    def weights_move(self) -> bool:
        """True when the α schedule changes the layer weights from epoch to epoch."""
        schedule = self.config.alpha_schedule
        return schedule is not None and not schedule.is_constant

    def loss_terms(
        self, model: Backbone, x: torch.Tensor, y: torch.Tensor, weights: dict[int, float] | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Total weighted loss and each weighted layer's CE. Heads run only where the weight is > 0."""
        return weighted_exit_loss(model, x, y, self.epoch_weights(model.num_layers) if weights is None else weights)

    def compute_loss(
        self, model: Backbone, x: torch.Tensor, y: torch.Tensor, weights: dict[int, float] | None = None
    ) -> torch.Tensor:
        """The training objective of one batch: Σ_l w_l · CE(logits_l, y) over the layers with w_l > 0."""
        return self.batch_loss(model, x, y, self.epoch_weights(model.num_layers) if weights is None else weights).loss

    def batch_loss(self, model: Backbone, x: torch.Tensor, y: torch.Tensor, weights: dict[int, float]) -> BatchLoss:
        """The training objective of one batch; subclasses return another objective and its report."""
        return BatchLoss(weighted_exit_loss(model, x, y, weights)[0])

    def epoch_summary(self, reports: list[Any], model: Backbone) -> dict[str, Any] | None:
        """A summary of one epoch's batch reports (None when the objective reports nothing)."""
        return None

    def trained_weights(self, weights: dict[int, float], summary: dict[str, Any] | None, model: Backbone) -> dict:
        """The weights an epoch effectively trained with (subclasses: e.g. the share of tokens on each route)."""
        return weights

    # --- optimisation -----------------------------------------------------------------------------------

    def create_optimizer(
        self, model: Backbone, base_lr: float = 1e-3, weight_decay: float = 0.0, **adamw_kwargs: Any
    ) -> torch.optim.Optimizer:
        """AdamW with one param group per layer, each at base_lr × its `layer_lr_scales` entry (default 1).

        The groups are the backbone's `param_groups()`. The embedding uses `embedding_lr_scale` (default:
        layer 1's scale, as it feeds layer 1); the shared final norm and output head use `head_lr_scale`
        (default 1.0, as every exit uses them). Frozen parameters (requires_grad=False) are left out, and a
        parameter shared by two groups (tied weights) is trained in the first.
        """
        if not (math.isfinite(base_lr) and base_lr > 0):
            raise ValueError(f"train.lr: must be a finite number > 0, got {base_lr}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"train.weight_decay: must be a finite number >= 0, got {weight_decay}")
        self._check(model)
        cfg = self.config
        scales = cfg.layer_lr_scales or {}

        def scale_of(name: str) -> float:
            if name == "embedding":
                return cfg.embedding_lr_scale or scales.get(1, 1.0)
            if name == "head":
                return cfg.head_lr_scale
            return scales.get(int(name.removeprefix("layer_")), 1.0)

        seen: set[int] = set()
        param_groups = []
        for name, params in model.param_groups():
            trainable = [p for p in params if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            if trainable:
                scale = scale_of(name)
                param_groups.append({"params": trainable, "lr": base_lr * scale, "lr_scale": scale, "name": name})
        if not param_groups:
            raise ValueError("create_optimizer: the model has no trainable parameters")
        return torch.optim.AdamW(param_groups, lr=base_lr, weight_decay=weight_decay, **adamw_kwargs)

    def train_epoch(
        self,
        model: Backbone,
        batches: Iterable[Batch],
        optimizer: torch.optim.Optimizer,
        epoch: int | None = None,
        total_epochs: int | None = None,
    ) -> EpochResult:
        """One pass over `batches`; returns the token-weighted mean loss and the layer weights used.

        Batches with `set_epoch` (EASE's own) are set to `epoch` first, so the data order is a function of
        (seed, epoch) alone, however the batches are iterated (a progress bar included).
        """
        self._check(model)
        epoch = self.epoch if epoch is None else epoch
        weights = self.epoch_weights(model.num_layers, epoch, total_epochs)
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        model.train()
        params = list(model.parameters())
        total, tokens, reports = 0.0, 0, []
        iterator = batches
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True)
        for x, y in iterator:
            x, y = x.to(self.device), y.to(self.device)
            loss, report = self.batch_loss(model, x, y, weights)
            check_finite(loss, f"epoch {epoch + 1}")
            optimizer_step(loss, params, optimizer, self.grad_clip)
            check_stop()  # a stop signal ends the run here, between steps
            total += loss.item() * y.numel()
            tokens += y.numel()
            if report is not None:
                reports.append(report)
        if tokens == 0:
            raise ValueError("train_batches: no batches to train on (empty data)")
        summary = self.epoch_summary(reports, model)
        trained = self.trained_weights(weights, summary, model)
        self.epoch = epoch + 1
        self.weight_history.append(trained)
        return EpochResult(total / tokens, trained, tokens, summary)

    # --- evaluation -------------------------------------------------------------------------------------

    def _routing(
        self, exit_layer: int | Sequence[int] | None, routing_threshold: float | Sequence[float] | None
    ) -> tuple[tuple[int, ...], tuple[float, ...]]:
        if exit_layer is None and routing_threshold is None:
            return self.config.exit_layers, self.config.routing_thresholds
        exits = self.config.exit_layers if exit_layer is None else exit_layer
        thresholds = self.config.routing_thresholds if routing_threshold is None else routing_threshold
        return normalize_routing(exits, thresholds)

    def token_stats(
        self, model: Backbone, batches: Iterable[Batch], exit_layers: Sequence[int] | None = None
    ) -> TokenStats:
        """The one evaluation pass behind `evaluate` and `threshold_analysis`."""
        self._check(model)
        exits = self.config.exit_layers if exit_layers is None else exit_layers
        # Score the layers of the last trained epoch's weights too: `evaluate` reports that objective, and an
        # α schedule puts weight on the config's exit layer even when this pass routes elsewhere.
        weight_sets = [self.config.weights_for(model.num_layers), *self.weight_history[-1:]]
        weighted = [layer for weights in weight_sets for layer, w in weights.items() if w > 0]
        return collect_token_stats(model, batches, exits, weighted, self.config.confidence, self.device)

    def objective_loss(self, stats: TokenStats, routed: dict[str, Any], num_layers: int) -> float:
        """The training objective on evaluated batches: the last trained epoch's weighted per-layer loss."""
        per_exit = stats.per_exit()
        weights = self.weight_history[-1] if self.weight_history else self.config.weights_for(num_layers)
        return sum(w * per_exit[layer]["loss"] for layer, w in weights.items() if w > 0)

    def evaluate(
        self,
        model: Backbone,
        batches: Iterable[Batch],
        exit_layer: int | Sequence[int] | None = None,
        routing_threshold: float | Sequence[float] | None = None,
        thresholds: Iterable[float | Sequence[float]] | None = None,
    ) -> dict[str, Any]:
        """Routed metrics: ppl, acc, shallow_ratio, compute_cost, routed_loss, plus loss (the training
        objective on these batches), per_exit {layer: {ppl, acc, loss}} and, if `thresholds` is given, the
        threshold table from the same pass. Routing defaults to the config's."""
        exits, ts = self._routing(exit_layer, routing_threshold)
        normalize_routing(exits, ts, model.num_layers)
        stats = self.token_stats(model, batches, exits)
        result = stats.routed(exits, ts)
        result["routed_loss"] = result.pop("loss")
        result["loss"] = self.objective_loss(stats, result, model.num_layers)
        result["per_exit"] = stats.per_exit()
        result["num_tokens"] = stats.num_tokens
        if thresholds is not None:
            result["threshold_analysis"] = threshold_rows(stats, exits, thresholds)
        return result

    def threshold_analysis(
        self,
        model: Backbone,
        batches: Iterable[Batch],
        thresholds: Iterable[float | Sequence[float]],
        exit_layer: int | Sequence[int] | None = None,
    ) -> list[dict[str, Any]]:
        """Seed 003's table (threshold, ppl, acc, shallow%, compute%) for every threshold, from one pass."""
        exits = self.config.exit_layers if exit_layer is None else normalize_routing(exit_layer, 0.0)[0]
        if exit_layer is not None and not isinstance(exit_layer, int):
            exits = tuple(int(e) for e in exit_layer)  # keep the caller's order: a pair [t_a, t_b] follows it
        return threshold_rows(self.token_stats(model, batches, exits), exits, thresholds)

    # --- the loop -------------------------------------------------------------------------------------

    def effective_monitor(self, monitor: str) -> str:
        """The validation quantity early stopping compares: `monitor`, except that the weighted objective
        ("loss") is replaced by the routed loss when an α schedule moves the weights, since losses weighted
        differently from epoch to epoch are not comparable."""
        if monitor not in MONITORS:
            raise ValueError(f"train.monitor: must be one of {', '.join(MONITORS)}, got {monitor!r}")
        return "routed_loss" if monitor == "loss" and self.weights_move else monitor

    def train_with_early_stopping(
        self,
        model: Backbone,
        train_batches: Iterable[Batch],
        val_batches: Iterable[Batch],
        optimizer: torch.optim.Optimizer,
        max_epochs: int = 100,
        patience: int = 1,
        verbose: bool = True,
        monitor: str = "loss",
        min_delta: float = 0.0,
        state: EarlyStoppingState | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train until `patience` epochs pass without the validation `monitor` improving, then restore the
        best epoch's weights (seed 004: patience defaults to 1).

        `monitor` is "loss" (the weighted training objective on validation, default), "ppl" or
        "routed_loss"; see `effective_monitor` for α schedules. `state` and `on_epoch_end` let a caller
        checkpoint and resume the loop (`ease.training.loop.fit`).
        """
        self.total_epochs = max_epochs
        watched = self.effective_monitor(monitor)

        def train_epoch(epoch: int) -> EpochOutcome:
            result = self.train_epoch(model, train_batches, optimizer, epoch, max_epochs)
            row = {
                "train_loss": result.loss,
                "weights": {int(k): float(v) for k, v in result.weights.items()},
                "train_tokens": result.tokens,
            }
            if result.stats is not None:
                row["route"] = result.stats
            return EpochOutcome(row, result.tokens)

        def validate() -> Validation:
            ev = self.evaluate(model, val_batches)
            row = {
                "val_loss": ev["loss"],
                "val_ppl": ev["ppl"],
                "val_acc": ev["acc"],
                "shallow_ratio": ev["shallow_ratio"],
                "compute_cost": ev["compute_cost"],
            }
            return Validation(ev[watched], row)

        def describe(row: dict[str, Any]) -> str:
            return (
                f"epoch {row['epoch']}: train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} "
                f"val_ppl {row['val_ppl']:.2f} acc {row['val_acc']:.3f} shallow {100 * row['shallow_ratio']:.1f}%"
            )

        result = fit(
            train_epoch, validate, lambda: copy.deepcopy(model.state_dict()), model.load_state_dict, max_epochs,
            patience, min_delta, state, on_epoch_end, describe if verbose else None,
        )  # fmt: skip
        result[f"best_val_{watched}"] = result.pop("best_metric")
        result["monitor"] = watched
        return result

    # --- resumable state ----------------------------------------------------------------------------------

    def training_state(
        self, optimizer: torch.optim.Optimizer, stopping: EarlyStoppingState, completed: bool
    ) -> dict[str, Any]:
        """What a resume needs beyond the weights: optimizer, schedule position, RNGs, early-stopping state."""
        return {
            "epoch": len(stopping.history),
            "completed": completed,
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(),
            "trainer": {"epoch": self.epoch, "weight_history": self.weight_history},
            "early_stopping": stopping.to_dict(),
        }

    def restore_training_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> EarlyStoppingState:
        """Put the optimizer, the schedule position and the RNGs back where `training_state` found them;
        returns the early-stopping state to pass to `train_with_early_stopping(state=...)`."""
        optimizer.load_state_dict(state["optimizer"])
        self.epoch = state["trainer"]["epoch"]
        self.weight_history = [{int(k): v for k, v in w.items()} for w in state["trainer"]["weight_history"]]
        set_rng_state(state["rng"])
        return EarlyStoppingState(**state["early_stopping"])


UniversalTrainer = Trainer  # seed 000's name
