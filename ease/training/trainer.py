"""Trainer: weighted multi-exit loss, per-layer learning rates, routed evaluation, early stopping.

It speaks to the model only through the backbone protocol (`ease.model.backbone`), so the native model and
any other backbone train the same way. `UniversalTrainer` is the same class under seed 000's name.

A subclass changes the training objective by overriding `batch_loss` (token-routed training does); what
a batch's loss reports besides the loss itself is returned as a value and summarised per epoch by
`epoch_summary`, never kept on the trainer.

One optimizer step takes `grad_accum` micro-batches (under autocast at the configured precision) with the
loss token-weighted over the whole step, on every rank of a data-parallel run (`ease.distributed`), then
sets the learning rate of the step (`ease.training.lr_schedule`). Training runs by epochs (`train_epoch`)
or by optimizer steps (`train_steps`), where step s reads group s mod G of epoch s div G (G groups per
epoch): the data of a step is a function of (seed, step) alone, so a run by steps resumes at any step.
"""

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from contextlib import AbstractContextManager, nullcontext
from itertools import islice
from typing import Any

import torch
from torch import nn

from ease.config import TrainingConfig
from ease.curriculum import ExitCurriculum
from ease.distillation import Distiller
from ease.distributed import SINGLE, DistContext, full_state_dict, load_full_state_dict
from ease.evaluation import Batch, TokenStats, collect_token_stats, merge_token_stats, threshold_rows
from ease.exit_classifier import classifier_loss
from ease.losses import weighted_exit_loss
from ease.model.backbone import Backbone, LayerFn
from ease.model.layer_dropout import LayerDropout
from ease.routing import normalize_routing
from ease.schedule import apply_alpha
from ease.stop import StopRequested, check_stop, pending_stop
from ease.training.config import MONITORS
from ease.training.loop import EpochCallback, EpochOutcome, Validation, fit
from ease.training.lr_schedule import LrSchedule
from ease.training.precision import Precision
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


class BatchLoss(tuple):
    """One batch's training loss and whatever the objective reports besides it (None for the weighted loss);
    unpacks as `loss, report`. `per_exit` holds each weighted exit's CE, for loggers (None when the objective
    has no per-exit terms)."""

    loss: torch.Tensor
    report: Any
    per_exit: dict[int, torch.Tensor] | None

    def __new__(cls, loss: torch.Tensor, report: Any = None, per_exit: dict | None = None) -> "BatchLoss":
        result = super().__new__(cls, (loss, report))
        result.loss, result.report, result.per_exit = loss, report, per_exit
        return result


class LossModule(nn.Module):
    """The trainer's objective as a module, so DDP / FSDP2 can wrap it: forward(x, y, weights) -> BatchLoss.

    Data-parallel engines synchronise gradients through their module's forward; the backbone's protocol
    calls (embed, layer, unembed) run inside this one.
    """

    def __init__(self, trainer: "Trainer", model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._trainer = [trainer]  # a list: not registered as a submodule

    def forward(self, x: torch.Tensor, y: torch.Tensor, weights: dict[int, float]) -> tuple:
        out = self._trainer[0].batch_loss(self.model, x, y, weights)
        loss, report, per_exit = out[0], out[1], getattr(out, "per_exit", None)
        if per_exit is not None:  # logged values only; views of the loss graph would confuse FSDP2's hooks
            per_exit = {layer: value.detach().clone() for layer, value in per_exit.items()}
        return loss, report, per_exit


class StepTotals:
    """Sums over the optimizer steps of one epoch or evaluation interval (this rank's share), and how many
    steps and seconds it has had: what a checkpoint written at a stop signal keeps of an unfinished interval."""

    def __init__(self, loss_sum: float = 0.0, tokens: int = 0, reports: list | None = None, steps: int = 0,
                 seconds: float = 0.0) -> None:  # fmt: skip
        self.loss_sum, self.tokens, self.reports = loss_sum, tokens, list(reports or [])
        self.steps, self.seconds = steps, seconds
        self.started = time.perf_counter()

    def to_dict(self) -> dict[str, Any]:
        seconds = self.seconds + time.perf_counter() - self.started
        return {"loss_sum": self.loss_sum, "tokens": self.tokens, "reports": self.reports, "steps": self.steps,
                "seconds": seconds}  # fmt: skip


class _FsdpNoSync:
    """FSDP2's counterpart of DDP's no_sync: hold the gradient reduce-scatter until the step's last micro-batch."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc: object) -> None:
        self.module.set_requires_gradient_sync(True)


def grouped(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive groups of `size` batches (the last may be shorter): one optimizer step each."""
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class FirstBatches:
    """The first `n` batches of `batches` (evaluation during training with train.eval_batches)."""

    def __init__(self, batches: Iterable[Batch], n: int | None) -> None:
        self.batches, self.n = batches, n

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches) if self.n is None else islice(iter(self.batches), self.n)


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
        grad_accum: int = 1,
        precision: str = "fp32",
        lr_schedule: LrSchedule | None = None,
        dist: DistContext = SINGLE,
        curriculum: ExitCurriculum | None = None,
        layer_dropout: LayerDropout | None = None,
        distill: Distiller | None = None,
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
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"train.grad_accum: must be an int >= 1, got {grad_accum!r}")
        self.grad_accum = grad_accum
        self.precision = Precision(precision, self.device)
        self.lr_schedule = lr_schedule if lr_schedule is not None and not lr_schedule.is_constant else None
        self.dist = dist
        self.epoch = 0  # epochs (or evaluation intervals) trained so far; drives the α schedule and data order
        self.step = 0  # optimizer steps taken so far
        self.total_steps: int | None = None  # set when training by steps: the α schedule then runs over steps
        self.weight_history: list[dict[int, float]] = []  # the weights each trained epoch used
        self.loss_module: nn.Module | None = None  # LossModule under DDP / FSDP2 (`wrap_distributed`)
        self.on_step: Callable[[dict[str, Any]], None] | None = None  # per-step record, e.g. for loggers
        self.totals: StepTotals | None = None  # the interval being trained
        self.resumed_totals: StepTotals | None = None  # an interrupted interval's sums, to carry on from
        self.last_span_seconds = 0.0
        # LayerSkip: which exits get loss at each step, and per-example layer dropout (None: off).
        self.curriculum = curriculum
        self.layer_dropout = layer_dropout
        self.planned_steps: int | None = None  # the run's optimizer steps (a gradual curriculum spans them)
        self._drop_generator: torch.Generator | None = None  # layer dropout's draws of the current step
        self.classifier_weight = 0.0  # > 0: the exit classifier's BCE joins the loss (routing.classifier.train=joint)
        self.distill = distill  # distillation to the exits (ease.distillation); None = the weighted CE alone

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

    def step_weights(self, weights: dict[int, float], num_layers: int) -> dict[int, float]:
        """The weights of the current optimizer step: `weights`, or the curriculum's at `self.step`."""
        if self.curriculum is None:
            return weights
        return self.curriculum.weights(self.step, self.planned_steps, num_layers)

    def layer_fn(self, model: Backbone) -> LayerFn | None:
        """Layer dropout's `layer_fn` while the model trains (None: every layer runs on every row)."""
        if self.layer_dropout is None or not model.training:
            return None
        if self._drop_generator is None:
            self._drop_generator = self.layer_dropout.generator(self.step, self.dist.rank)
        return self.layer_dropout.layer_fn(model, self._drop_generator)

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
        layer_fn = self.layer_fn(model)
        report = None
        if self.distill is not None:  # + the KL to the teacher; the report is each student exit's KL
            out = self.distill.loss(model, x, y, weights, layer_fn)
            loss, per_exit, report = out.loss, out.per_exit, {"kl": out.kl, "tokens": out.tokens}
        else:
            loss, per_exit = weighted_exit_loss(model, x, y, weights, layer_fn)
        if self.classifier_weight > 0:  # CALM's exit classifier trained jointly, on detached states
            loss = loss + self.classifier_weight * classifier_loss(model, x)
        auxiliary = getattr(model, "auxiliary_loss", None)  # e.g. Mixture-of-Depths' routing predictor
        if auxiliary is not None and (term := auxiliary()) is not None:
            loss = loss + term
        return BatchLoss(loss, report, per_exit)

    def epoch_summary(self, reports: list[Any], model: Backbone) -> dict[str, Any] | None:
        """A summary of one epoch's batch reports (None when the objective reports nothing)."""
        return self.distill.summary(reports) if self.distill is not None and reports else None

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
        totals = self._open_totals()
        iterator = batches if not totals.steps else batches.iter_from(epoch, totals.steps * self.grad_accum)
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True)
        for group in grouped(iterator, self.grad_accum):
            step_weights = self.step_weights(weights, model.num_layers)
            self.train_step(model, group, optimizer, step_weights, params, f"epoch {epoch + 1}", totals)
        self.epoch = epoch + 1
        return self._span_result(totals, weights, model)

    def steps_per_epoch(self, batches: Sized) -> int:
        """Optimizer steps in one pass over `batches` (groups of grad_accum batches; the last may be short)."""
        return -(-len(batches) // self.grad_accum)

    def train_steps(self, model: Backbone, batches: Any, optimizer: torch.optim.Optimizer, stop: int) -> EpochResult:
        """Optimizer steps `self.step` .. `stop - 1` of a run by steps (`self.total_steps` of them).

        Step s trains on group s mod G of epoch s div G (G = `steps_per_epoch`), read with
        `batches.iter_from(epoch, first_batch)`, so any span of steps reads the same data however the run was
        cut (a resume included). The α schedule, when there is one, moves over the steps.
        """
        self._check(model)
        per_epoch = self.steps_per_epoch(batches)
        model.train()
        params = list(model.parameters())
        totals = self._open_totals()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=stop - self.step, desc=f"steps {self.step + 1}-{stop}", leave=False, dynamic_ncols=True)
        weights = self.epoch_weights(model.num_layers, self.step, self.total_steps)
        while self.step < stop:
            epoch, group_index = divmod(self.step, per_epoch)
            count = min(stop - self.step, per_epoch - group_index)
            groups = grouped(batches.iter_from(epoch, group_index * self.grad_accum), self.grad_accum)
            for group in islice(groups, count):
                weights = self.epoch_weights(model.num_layers, self.step, self.total_steps)
                step_weights = self.step_weights(weights, model.num_layers)
                self.train_step(model, group, optimizer, step_weights, params, f"step {self.step + 1}", totals)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        self.epoch += 1
        return self._span_result(totals, weights, model)

    def _open_totals(self) -> StepTotals:
        """The sums of the interval being trained: carried over from a checkpoint written at a stop signal, or
        new. Kept on the trainer while the interval runs, so a stop can save them (`interrupted_state`)."""
        self.totals = self.resumed_totals or StepTotals()
        self.resumed_totals = None
        return self.totals

    def interrupted_state(self) -> dict[str, Any] | None:
        """Where an interval stopped by a signal stands (None outside one): resume continues it from here."""
        return self.totals.to_dict() if self.totals is not None and self.totals.steps else None

    def _span_result(self, totals: StepTotals, weights: dict[int, float], model: Backbone) -> EpochResult:
        self.totals = None
        self.last_span_seconds = totals.seconds  # time the interval had before a resume
        loss_sum, tokens = totals.loss_sum, totals.tokens
        reports = totals.reports
        if self.dist.enabled:  # the epoch's loss and reports over every rank's share
            loss_sum, tokens = self.dist.all_reduce_sum([loss_sum, float(tokens)])
            tokens = int(tokens)
            reports = [report for part in self.dist.gather(reports) for report in part]
        if tokens == 0:
            raise ValueError("train_batches: no batches to train on (empty data)")
        summary = self.epoch_summary(reports, model)
        trained = self.trained_weights(weights, summary, model)
        self.weight_history.append(trained)
        return EpochResult(loss_sum / tokens, trained, tokens, summary)

    def _objective(self, model: Backbone, x: torch.Tensor, y: torch.Tensor, weights: dict[int, float]) -> BatchLoss:
        with self.precision.autocast():
            if self.loss_module is not None:
                return BatchLoss(*self.loss_module(x, y, weights))
            return self.batch_loss(model, x, y, weights)

    def _grad_sync(self, enabled: bool) -> AbstractContextManager:
        """Skip the gradient all-reduce on every micro-batch of a step but the last (DDP no_sync / FSDP2)."""
        module = self.loss_module
        if enabled or module is None:
            return nullcontext()
        if hasattr(module, "no_sync"):
            return module.no_sync()
        return _FsdpNoSync(module)

    def train_step(
        self,
        model: Backbone,
        group: list[Batch],
        optimizer: torch.optim.Optimizer,
        weights: dict[int, float],
        params: list[nn.Parameter],
        where: str,
        totals: StepTotals,
    ) -> None:
        """One optimizer step on the micro-batches of `group`: the loss is token-weighted over the step (over
        every rank's micro-batches too), so grad_accum × batch b equals one batch of grad_accum·b."""
        t0 = time.perf_counter()
        if self.layer_dropout is not None:  # this step's draws: a function of (seed, step, rank)
            self._drop_generator = self.layer_dropout.generator(self.step, self.dist.rank)
        group = [(x.to(self.device), y.to(self.device)) for x, y in group]
        local = sum(y.numel() for _, y in group)
        step_tokens = self.dist.all_reduce_sum([float(local)])[0] if self.dist.enabled else local
        lr_factor = self.lr_schedule.apply(optimizer, self.step) if self.lr_schedule is not None else 1.0
        optimizer.zero_grad(set_to_none=True)
        step_sum, per_exit = 0.0, {}
        for i, (x, y) in enumerate(group):
            with self._grad_sync(i == len(group) - 1):
                out = self._objective(model, x, y, weights)  # a BatchLoss, or a (loss, report) pair
                loss, report, terms = out[0], out[1], getattr(out, "per_exit", None)
                bad = not bool(torch.isfinite(loss))
                if self.dist.any(bad) if self.dist.enabled else bad:
                    raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) at {where}")
                # Each micro-batch's share of the step's tokens; DDP averages over ranks, hence × world size.
                scale = y.numel() * self.dist.world_size / step_tokens
                self.precision.backward(loss if scale == 1.0 else loss * scale)
            step_sum += loss.item() * y.numel()
            if report is not None:
                totals.reports.append(report)
            if self.on_step is not None and terms:
                for layer, value in terms.items():
                    per_exit[layer] = per_exit.get(layer, 0.0) + float(value.detach()) * y.numel()
        self.precision.step(optimizer, params, self.grad_clip)
        self.step += 1
        totals.loss_sum += step_sum
        totals.tokens += local
        totals.steps += 1
        self._check_stop()  # a stop signal ends the run here, between steps
        if self.on_step is not None:
            self._report_step(step_sum, local, per_exit, optimizer, lr_factor, time.perf_counter() - t0)

    def _check_stop(self) -> None:
        if not self.dist.enabled:
            check_stop()
            return
        signum = pending_stop()
        if self.dist.any(signum is not None):  # every rank stops at the same step, or the others would hang
            raise StopRequested(signum if signum is not None else 15)

    def _report_step(
        self, loss_sum: float, tokens: int, per_exit: dict[int, float], optimizer: Any, factor: float, seconds: float
    ) -> None:
        record: dict[str, Any] = {
            "step": self.step,
            "train/loss": loss_sum / max(tokens, 1),
            "train/lr": optimizer.param_groups[0]["lr"],
            "train/lr_factor": factor,
            "train/tokens_per_s": tokens * self.dist.world_size / seconds if seconds > 0 else None,
        }
        for layer, value in sorted(per_exit.items()):
            record[f"train/loss_exit_{layer}"] = value / max(tokens, 1)
        self.on_step(record)

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
        if self.dist.enabled and hasattr(batches, "shard"):  # each rank scores its block of every batch
            batches = batches.shard(self.dist.rank, self.dist.world_size)
        unshard = getattr(self.loss_module, "unshard", None)  # FSDP2: the root's own weights (embedding, head)
        if unshard is not None:
            unshard()
        try:
            with self.precision.autocast():
                stats = collect_token_stats(model, batches, exits, weighted, self.config.confidence, self.device)
        finally:
            if unshard is not None:
                self.loss_module.reshard()
        return merge_token_stats(self.dist.gather(stats)) if self.dist.enabled else stats

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
        max_epochs: int | None = 100,
        patience: int = 1,
        verbose: bool = True,
        monitor: str = "loss",
        min_delta: float = 0.0,
        state: EarlyStoppingState | None = None,
        on_epoch_end: EpochCallback | None = None,
        max_steps: int | None = None,
        eval_every: int | None = None,
        eval_batches: int | None = None,
    ) -> dict[str, Any]:
        """Train until `patience` evaluations pass without the validation `monitor` improving, then restore
        the best evaluation's weights (seed 004: patience defaults to 1).

        By epochs (default): one evaluation per epoch, at most `max_epochs`. By steps (`max_steps` set):
        `max_steps` optimizer steps with an evaluation every `eval_every` steps (default: once per pass over
        the data); history rows then also carry `step` and `data_epoch` (passes over the data so far), and
        their `epoch` numbers the evaluations. `eval_batches` limits each evaluation during training to the
        first batches of `val_batches`. `monitor` is "loss" (the weighted training objective on validation,
        default), "ppl" or "routed_loss"; see `effective_monitor` for α schedules. `state` and `on_epoch_end`
        let a caller checkpoint and resume the loop (`ease.training.loop.fit`).
        """
        by_steps = max_steps is not None
        per_epoch = self.steps_per_epoch(train_batches) if by_steps else None
        if by_steps:
            every = min(eval_every or per_epoch, max_steps)
            rounds = -(-max_steps // every)
            self.total_steps = self.planned_steps = max_steps
            if self.lr_schedule is not None:
                self.lr_schedule.total_steps = max_steps
        else:
            if max_epochs is None:
                raise ValueError("train.max_steps: set train.max_steps or train.max_epochs (both are null)")
            rounds = max_epochs
            self.total_epochs = max_epochs
            if self.curriculum is not None and hasattr(train_batches, "__len__"):  # a gradual curriculum spans them
                self.planned_steps = max_epochs * self.steps_per_epoch(train_batches)
            if self.lr_schedule is not None:
                self.lr_schedule.total_steps = max_epochs * self.steps_per_epoch(train_batches)
        watched = self.effective_monitor(monitor)
        val = FirstBatches(val_batches, eval_batches)

        def train_epoch(epoch: int) -> EpochOutcome:
            if by_steps:
                result = self.train_steps(model, train_batches, optimizer, min((epoch + 1) * every, max_steps))
            else:
                result = self.train_epoch(model, train_batches, optimizer, epoch, max_epochs)
            row = {
                "train_loss": result.loss,
                "weights": {int(k): float(v) for k, v in result.weights.items()},
                "train_tokens": result.tokens,
            }
            if self.last_span_seconds:  # the part trained before a stop signal and resume
                row["resumed_seconds"] = self.last_span_seconds
            if by_steps:
                row.update(step=self.step, data_epoch=self.step / per_epoch)
            if result.stats is not None:
                row["distill" if self.distill is not None else "route"] = result.stats
            return EpochOutcome(row, result.tokens)

        def validate() -> Validation:
            ev = self.evaluate(model, val)
            row = {
                "val_loss": ev["loss"],
                "val_ppl": ev["ppl"],
                "val_acc": ev["acc"],
                "shallow_ratio": ev["shallow_ratio"],
                "compute_cost": ev["compute_cost"],
            }
            return Validation(ev[watched], row)

        def describe(row: dict[str, Any]) -> str:
            where = f"step {row['step']}" if by_steps else f"epoch {row['epoch']}"
            return (
                f"{where}: train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} "
                f"val_ppl {row['val_ppl']:.2f} acc {row['val_acc']:.3f} shallow {100 * row['shallow_ratio']:.1f}%"
            )

        def snapshot() -> dict[str, torch.Tensor]:  # full weights, also of a sharded model
            return copy.deepcopy(full_state_dict(model, self.dist, self.loss_module))

        def restore(weights: dict[str, torch.Tensor]) -> None:
            load_full_state_dict(model, weights, self.dist, self.loss_module)

        result = fit(
            train_epoch, validate, snapshot, restore, rounds, patience, min_delta, state, on_epoch_end,
            describe if verbose else None,
        )  # fmt: skip
        result[f"best_val_{watched}"] = result.pop("best_metric")
        result["monitor"] = watched
        if by_steps:
            history = result["history"]
            best = result["best_epoch"]
            result.update(steps_run=self.step, best_step=history[best - 1]["step"] if best >= 1 else None)
        return result

    # --- resumable state ----------------------------------------------------------------------------------

    def training_state(
        self, optimizer: torch.optim.Optimizer, stopping: EarlyStoppingState, completed: bool
    ) -> dict[str, Any]:
        """What a resume needs beyond the weights: optimizer, schedule position, RNGs, early-stopping state."""
        from ease.distributed import optimizer_state_dict

        trainer = {"epoch": self.epoch, "step": self.step, "weight_history": self.weight_history}
        if self.layer_dropout is not None:
            trainer["layer_dropout"] = self.layer_dropout.state_dict()
        return {
            "epoch": len(stopping.history),
            "completed": completed,
            "optimizer": optimizer_state_dict(self.loss_module, optimizer, self.dist),
            "rng": rng_state(),
            "trainer": trainer,
            "precision": self.precision.state_dict(),
            "early_stopping": stopping.to_dict(),
            "interval": self.interrupted_state(),
        }

    def restore_training_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> EarlyStoppingState:
        """Put the optimizer, the schedule position and the RNGs back where `training_state` found them;
        returns the early-stopping state to pass to `train_with_early_stopping(state=...)`."""
        from ease.distributed import load_optimizer_state_dict

        load_optimizer_state_dict(self.loss_module, optimizer, state["optimizer"], self.dist)
        self.epoch = state["trainer"]["epoch"]
        self.step = state["trainer"].get("step", 0)
        self.precision.load_state_dict(state.get("precision", {}))
        interval = state.get("interval")
        self.resumed_totals = StepTotals(**interval) if interval else None
        self.weight_history = [{int(k): v for k, v in w.items()} for w in state["trainer"]["weight_history"]]
        if self.layer_dropout is not None and "layer_dropout" in state["trainer"]:
            self.layer_dropout.load_state_dict(state["trainer"]["layer_dropout"])
        set_rng_state(state["rng"])
        return EarlyStoppingState(**state["early_stopping"])


UniversalTrainer = Trainer  # seed 000's name
