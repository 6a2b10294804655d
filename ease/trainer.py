"""Trainer: weighted multi-exit loss, per-layer learning rates, routed evaluation, early stopping.

`UniversalTrainer` is the same class under seed 000's name.
"""

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ease.config import TrainingConfig
from ease.evaluation import Batch, TokenStats, collect_token_stats, threshold_rows
from ease.routing import normalize_routing
from ease.schedule import apply_alpha

log = logging.getLogger("ease.trainer")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; training stops before the bad step is applied."""


class EpochResult(NamedTuple):
    """What `train_epoch` returns: unpacks as `loss, weights` (seed 000) and converts with float() (seed 004)."""

    loss: float
    weights: dict[int, float]

    def __float__(self) -> float:
        return float(self.loss)

    def __format__(self, spec: str) -> str:
        return format(self.loss, spec)


@dataclass
class EarlyStoppingState:
    """Everything early stopping needs to carry on after a restart."""

    best_metric: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains and evaluates an `EarlyExitTransformer` as a `TrainingConfig` says."""

    def __init__(
        self,
        config: TrainingConfig,
        vocab_size: int | None = None,
        device: str | torch.device = "cpu",
        grad_clip: float | None = 1.0,
        total_epochs: int | None = None,
        progress: bool = False,
    ) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.grad_clip = grad_clip
        self.total_epochs = total_epochs
        self.progress = progress
        self.epoch = 0  # epochs trained so far by train_epoch; drives the α schedule
        self.weight_history: list[dict[int, float]] = []
        self.last_epoch_tokens = 0

    # --- loss -------------------------------------------------------------------------------------------

    def _check(self, model: nn.Module) -> None:
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

    def loss_terms(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: dict[int, float] | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Total weighted loss and each weighted layer's CE. Heads run only where the weight is > 0."""
        weights = self.epoch_weights(model.num_layers) if weights is None else weights
        layers = sorted(layer for layer, w in weights.items() if w > 0)
        hidden = model.hidden_states(x, layers)  # {layer: (B, T, C)}
        h = torch.stack([hidden[layer] for layer in layers])  # (k, B, T, C)
        logits = model.unembed(h)  # (k, B, T, V): one head call for every weighted exit
        k, V = len(layers), logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1).repeat(k), reduction="none")
        per_layer = ce.view(k, -1).mean(dim=1)  # (k,)
        w = torch.tensor([weights[layer] for layer in layers], dtype=per_layer.dtype, device=per_layer.device)
        return (w * per_layer).sum(), dict(zip(layers, per_layer))

    def compute_loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: dict[int, float] | None = None
    ) -> torch.Tensor:
        """Σ_l w_l · CE(logits_l, y) over the layers with w_l > 0."""
        return self.loss_terms(model, x, y, weights)[0]

    # --- optimisation -----------------------------------------------------------------------------------

    def create_optimizer(
        self, model: nn.Module, base_lr: float = 1e-3, weight_decay: float = 0.0, **adamw_kwargs: Any
    ) -> torch.optim.Optimizer:
        """AdamW with one param group per layer, each at base_lr × its `layer_lr_scales` entry (default 1).

        The embedding uses `embedding_lr_scale` (default: layer 1's scale, as it feeds layer 1); the
        shared final norm and output head use `head_lr_scale` (default 1.0, as every exit uses them).
        Frozen parameters (requires_grad=False) are left out.
        """
        if not (math.isfinite(base_lr) and base_lr > 0):
            raise ValueError(f"train.lr: must be a finite number > 0, got {base_lr}")
        self._check(model)
        cfg = self.config
        scales = cfg.layer_lr_scales or {}
        groups: list[tuple[str, float, list[nn.Parameter]]] = [
            ("embedding", cfg.embedding_lr_scale or scales.get(1, 1.0), list(model.embedding.parameters()))
        ]
        for i, block in enumerate(model.layers, start=1):
            groups.append((f"layer_{i}", scales.get(i, 1.0), list(block.parameters())))
        groups.append(("head", cfg.head_lr_scale, [*model.norm.parameters(), *model.output_head.parameters()]))
        seen: set[int] = set()
        param_groups = []
        for name, scale, params in groups:
            trainable = [p for p in params if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            if trainable:
                param_groups.append({"params": trainable, "lr": base_lr * scale, "lr_scale": scale, "name": name})
        if not param_groups:
            raise ValueError("create_optimizer: the model has no trainable parameters")
        return torch.optim.AdamW(param_groups, lr=base_lr, weight_decay=weight_decay, **adamw_kwargs)

    def train_epoch(
        self,
        model: nn.Module,
        batches: Iterable[Batch],
        optimizer: torch.optim.Optimizer,
        epoch: int | None = None,
        total_epochs: int | None = None,
    ) -> EpochResult:
        """One pass over `batches`; returns the token-weighted mean loss and the layer weights used."""
        self._check(model)
        epoch = self.epoch if epoch is None else epoch
        weights = self.epoch_weights(model.num_layers, epoch, total_epochs)
        model.train()
        total, tokens = 0.0, 0
        iterator = batches
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True)
        for x, y in iterator:
            x, y = x.to(self.device), y.to(self.device)
            loss = self.compute_loss(model, x, y, weights)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) at epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            optimizer.step()
            total += loss.item() * y.numel()
            tokens += y.numel()
        if tokens == 0:
            raise ValueError("train_batches: no batches to train on (empty data)")
        self.epoch = epoch + 1
        self.weight_history.append(weights)
        self.last_epoch_tokens = tokens
        return EpochResult(total / tokens, weights)

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
        self, model: nn.Module, batches: Iterable[Batch], exit_layers: Sequence[int] | None = None
    ) -> TokenStats:
        """The one evaluation pass behind `evaluate` and `threshold_analysis`."""
        self._check(model)
        exits = self.config.exit_layers if exit_layers is None else exit_layers
        # Score the layers of the last trained epoch's weights too: `evaluate` reports that objective, and an
        # α schedule puts weight on the config's exit layer even when this pass routes elsewhere.
        weight_sets = [self.config.weights_for(model.num_layers), *self.weight_history[-1:]]
        weighted = [layer for weights in weight_sets for layer, w in weights.items() if w > 0]
        return collect_token_stats(model, batches, exits, weighted, self.config.confidence, self.device)

    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[Batch],
        exit_layer: int | Sequence[int] | None = None,
        routing_threshold: float | Sequence[float] | None = None,
        thresholds: Iterable[float | Sequence[float]] | None = None,
    ) -> dict[str, Any]:
        """Routed metrics: ppl, acc, shallow_ratio, compute_cost, plus loss (the training objective on
        these batches), per_exit {layer: {ppl, acc, loss}} and, if `thresholds` is given, the threshold
        table from the same pass. Routing defaults to the config's."""
        exits, ts = self._routing(exit_layer, routing_threshold)
        normalize_routing(exits, ts, model.num_layers)
        stats = self.token_stats(model, batches, exits)
        result = stats.routed(exits, ts)
        result["routed_loss"] = result.pop("loss")
        per_exit = stats.per_exit()
        # The objective of the last trained epoch (it moves when an α schedule is set).
        weights = self.weight_history[-1] if self.weight_history else self.config.weights_for(model.num_layers)
        result["loss"] = sum(w * per_exit[layer]["loss"] for layer, w in weights.items() if w > 0)
        result["per_exit"] = per_exit
        result["num_tokens"] = stats.num_tokens
        if thresholds is not None:
            result["threshold_analysis"] = threshold_rows(stats, exits, thresholds)
        return result

    def threshold_analysis(
        self,
        model: nn.Module,
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

    def train_with_early_stopping(
        self,
        model: nn.Module,
        train_batches: Iterable[Batch],
        val_batches: Iterable[Batch],
        optimizer: torch.optim.Optimizer,
        max_epochs: int = 100,
        patience: int = 1,
        verbose: bool = True,
        monitor: str = "loss",
        min_delta: float = 0.0,
        state: EarlyStoppingState | None = None,
        on_epoch_end: Callable[[int, EarlyStoppingState], None] | None = None,
    ) -> dict[str, Any]:
        """Train until `patience` epochs pass without the validation `monitor` improving, then restore the
        best epoch's weights (seed 004: patience defaults to 1).

        `monitor` is "loss" (the weighted training objective on validation, default) or any key of
        `evaluate`'s result where lower is better ("ppl", "routed_loss"). `state` and `on_epoch_end` let
        a caller checkpoint and resume the loop.
        """
        if max_epochs < 1:
            raise ValueError(f"train.max_epochs: must be >= 1, got {max_epochs}")
        if patience < 1:
            raise ValueError(f"train.patience: must be >= 1, got {patience}")
        self.total_epochs = max_epochs
        state = state or EarlyStoppingState()
        t0 = time.perf_counter()
        for epoch in range(len(state.history), max_epochs):
            if state.bad_epochs >= patience:  # a resumed run that had already stopped
                break
            if hasattr(train_batches, "set_epoch"):
                train_batches.set_epoch(epoch)  # data order depends on (seed, epoch) only, so resume repeats it
            t_epoch = time.perf_counter()
            result = self.train_epoch(model, train_batches, optimizer, epoch, max_epochs)
            train_time = time.perf_counter() - t_epoch
            ev = self.evaluate(model, val_batches)
            metric = ev[monitor]
            improved = math.isfinite(metric) and metric < state.best_metric - min_delta
            row = {
                "epoch": epoch + 1,
                "train_loss": result.loss,
                "val_loss": ev["loss"],
                "val_ppl": ev["ppl"],
                "val_acc": ev["acc"],
                "shallow_ratio": ev["shallow_ratio"],
                "compute_cost": ev["compute_cost"],
                "weights": {int(k): float(v) for k, v in result.weights.items()},
                "train_tokens": self.last_epoch_tokens,
                "train_time_s": train_time,
                "tokens_per_s": self.last_epoch_tokens / train_time if train_time > 0 else None,
                "improved": improved,
            }
            state.history.append(row)
            if improved:
                state.best_metric, state.best_epoch, state.bad_epochs = metric, epoch + 1, 0
                state.best_state = copy.deepcopy(model.state_dict())
            else:
                state.bad_epochs += 1
            if verbose:
                log.info(
                    "epoch %d: train_loss %.4f val_loss %.4f val_ppl %.2f acc %.3f shallow %.1f%%%s",
                    epoch + 1, result.loss, ev["loss"], ev["ppl"], ev["acc"], 100 * ev["shallow_ratio"],
                    " *" if improved else "",
                )  # fmt: skip
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, state)
        if state.best_state is not None:
            model.load_state_dict(state.best_state)
        train_tokens = sum(row["train_tokens"] for row in state.history)
        train_seconds = sum(row["train_time_s"] for row in state.history)
        return {
            "best_epoch": state.best_epoch,
            f"best_val_{monitor}": state.best_metric,
            "epochs_run": len(state.history),
            "stopped_early": state.bad_epochs >= patience,
            "history": state.history,
            "train_time_s": time.perf_counter() - t0,
            "tokens_per_s": train_tokens / train_seconds if train_seconds > 0 else None,
        }


UniversalTrainer = Trainer  # seed 000's name
