"""ASHEM's two phases: Block 1 on every token (the standard Trainer), Block 2 on the hard tokens (cached).

Both phases run through the one training loop, `ease.training.loop.fit`. Phase 2 supplies its own epoch
(the hard-token loss of `ease.losses` on cached layer-k states) and its own validation (the hard-token loss
on the validation cache, plus the two-stage routed metrics computed from that cache).

Attention context of hard tokens. The cache holds whole windows (every position, easy or hard), and
phase 2 runs Block 2 over the whole window; only the loss is restricted to hard positions. A hard token
therefore attends, in layers k+1..L, to the Block-2 states of all earlier tokens of its window, easy ones
included, just as at inference in counted mode. Easy tokens thus train Block 2 indirectly, as context
(their keys and values get gradients through the hard tokens' attention), never through their own loss.
"""

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ease.evaluation import Batch
from ease.losses import hard_token_loss, upper_layer_logits
from ease.model.backbone import Backbone, run_layers
from ease.routing import confidence_fn
from ease.stop import StopRequested, check_stop
from ease.strategies.ashem.batches import HardBatch, HardExampleBatches, create_hard_example_loader
from ease.strategies.ashem.cache import HardExamples
from ease.strategies.ashem.config import ASHEMConfig
from ease.training.loop import EpochOutcome, Validation, fit
from ease.training.state import EarlyStoppingState
from ease.training.trainer import Trainer, check_finite, optimizer_step

log = logging.getLogger("ease.ashem")


# --- phase 1 ------------------------------------------------------------------------------------------------


def train_phase1(
    config: ASHEMConfig,
    model: Backbone,
    train_batches: Iterable[Batch],
    val_batches: Iterable[Batch],
    device: str | torch.device = "cpu",
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    monitor: str = "loss",
    progress: bool = False,
    verbose: bool = True,
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    on_stop: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Phase 1: Block 1 on every token with early stopping; returns its record (val metrics, history, ...).

    `on_epoch_end(epoch, state)` gets {"phase1_train": training state} after every epoch; `resume` (the
    model's weights under "model" and such a state under "train_state") carries on from that epoch. A stop
    signal between two training steps calls `on_stop(epochs done, state)` with the state at that step (its
    "interval" holds the unfinished epoch's sums), then `StopRequested` propagates; resuming from that state
    carries on from the next step.
    """
    trainer = Trainer(config.phase1_config(), model.vocab_size, device, grad_clip, progress=progress)
    optimizer = trainer.create_optimizer(model, config.phase1_lr, weight_decay)
    stopping = EarlyStoppingState()
    if resume is not None:
        model.load_state_dict(resume["model"])
        stopping = trainer.restore_training_state(resume["train_state"]["phase1_train"], optimizer)

    def epoch_end(epoch: int, stopping: EarlyStoppingState) -> None:
        if on_epoch_end is not None:
            on_epoch_end(epoch, {"phase1_train": trainer.training_state(optimizer, stopping, completed=False)})

    try:
        result = trainer.train_with_early_stopping(
            model, train_batches, val_batches, optimizer, config.max_epochs, config.phase1_patience, verbose,
            monitor, state=stopping, on_epoch_end=epoch_end,
        )  # fmt: skip
    except StopRequested:
        if on_stop is not None and trainer.interrupted_state() is not None:  # stopped between two steps
            on_stop(len(stopping.history), {"phase1_train": trainer.training_state(optimizer, stopping, False)})
        raise
    ev = trainer.evaluate(model, val_batches)
    return {
        "metrics": {key: ev[key] for key in ("ppl", "acc", "loss", "per_exit")},
        "history": result["history"],
        "best_epoch": result["best_epoch"],
        "epochs_run": result["epochs_run"],
        "train_time_s": result["train_time_s"],
        "tokens_per_s": result["tokens_per_s"],
    }


# --- phase 2: epochs and scores on the cached states ---------------------------------------------------------


@dataclass
class EpochSums:
    """How far one phase-2 epoch has gone: batches done and the hard-token loss summed so far.

    A stop signal between two steps leaves these in the checkpoint; the resumed epoch skips the batches done
    (the epoch's order is a function of (seed, epoch)) and adds to the same sums, so its mean loss is the
    uninterrupted epoch's.
    """

    epoch: int = 0
    batches: int = 0
    loss_sum: float = 0.0
    tokens: int = 0


def train_upper_layers(
    model: Backbone,
    hard_batches: Iterable[HardBatch],
    optimizer: torch.optim.Optimizer,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    num_lower_layers: int = 2,
    grad_clip: float | None = 1.0,
    sums: EpochSums | None = None,
) -> float:
    """One epoch of Block 2 on the hard tokens, from cached states; returns the mean hard-token loss.

    `sums` (updated in place after every batch) carries on an epoch a stop signal interrupted: its first
    `sums.batches` batches are skipped.
    """
    if vocab_size is not None and vocab_size != model.vocab_size:
        raise ValueError(f"vocab_size: {vocab_size} does not match the model's {model.vocab_size}")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    sums = sums if sums is not None else EpochSums()
    for i, (hidden, targets, mask) in enumerate(hard_batches):
        if i < sums.batches:  # done before the stop this epoch resumes from
            continue
        hidden, targets, mask = hidden.to(device), targets.to(device), mask.to(device)
        n = int(mask.sum().item())
        if n > 0:
            loss = hard_token_loss(model, hidden, targets, mask, num_lower_layers)
            check_finite(loss, "phase 2")
            optimizer_step(loss, trainable, optimizer, grad_clip)
            sums.loss_sum += loss.item() * n
            sums.tokens += n
        sums.batches = i + 1
        if n > 0:
            check_stop()
    if sums.tokens == 0:
        raise ValueError("train_upper_layers: no hard tokens in the batches")
    return sums.loss_sum / sums.tokens


def _nll_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    nll = F.cross_entropy(logits.float(), targets, reduction="sum").item()
    return nll, int((logits.argmax(-1) == targets).sum().item())


def _summary(nll: float, correct: int, n: int) -> dict[str, float]:
    loss = nll / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "acc": correct / max(n, 1), "num_tokens": n}


@torch.no_grad()
def evaluate_on_hard_examples(
    model: Backbone,
    hard_examples: HardExamples,
    device: str | torch.device = "cpu",
    num_lower_layers: int | None = None,
    batch_size: int = 64,
    layer: int | None = None,
) -> dict[str, float]:
    """Loss, perplexity and accuracy of the model on the hard tokens, from the cached states.

    `layer` is the layer that scores them: the last (default), or the exit layer k (what the hard tokens
    would get if they exited; no upper layer runs then).
    """
    k = hard_examples.exit_layer if num_lower_layers is None else num_lower_layers
    was_training = model.training
    model.eval()
    nll, correct, n = 0.0, 0, 0
    try:
        for hidden, targets, mask in HardExampleBatches(hard_examples, batch_size, shuffle=False):
            hidden, targets, mask = hidden.to(device), targets.to(device), mask.to(device)
            b_nll, b_correct = _nll_stats(upper_layer_logits(model, hidden, mask, k, layer), targets[mask])
            nll, correct, n = nll + b_nll, correct + b_correct, n + int(mask.sum().item())
    finally:
        model.train(was_training)
    return _summary(nll, correct, n)


@torch.no_grad()
def evaluate_routed_from_cache(
    model: Backbone,
    cache: HardExamples,
    threshold: float,
    confidence: str = "max_prob",
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> dict[str, float]:
    """Two-stage routed metrics over every cached position, without re-running the frozen block.

    Equals `Trainer.evaluate` with routing (k, threshold) as long as layers 1..k are the ones cached.
    """
    k, L = cache.exit_layer, model.num_layers
    measure = confidence_fn(confidence)
    was_training = model.training
    model.eval()
    nll, correct, shallow, n = 0.0, 0, 0, 0
    try:
        for start in range(0, cache.hidden_states.shape[0], batch_size):
            hidden = cache.hidden_states[start : start + batch_size].to(device)  # (B, T, C)
            targets = cache.targets[start : start + batch_size].to(device).reshape(-1)
            exit_logits = model.unembed(hidden).reshape(targets.numel(), -1)  # (N, V)
            final_logits = model.unembed(run_layers(model, hidden, k, L)).reshape(targets.numel(), -1)
            exits = measure(exit_logits) >= threshold  # (N,)
            logits = torch.where(exits.unsqueeze(1), exit_logits, final_logits)
            b_nll, b_correct = _nll_stats(logits, targets)
            nll, correct, n = nll + b_nll, correct + b_correct, n + targets.numel()
            shallow += int(exits.sum().item())
    finally:
        model.train(was_training)
    out = _summary(nll, correct, n)
    out["shallow_ratio"] = shallow / max(n, 1)
    out["compute_cost"] = (shallow * k + (n - shallow) * L) / (max(n, 1) * L)
    return out


# --- phase 2: the loop ----------------------------------------------------------------------------------------


@dataclass
class Phase2State:
    """Where phase 2 stands: enough, with the model's and optimizer's state, to carry on after a restart.

    Attributes:
        stopping: early stopping on the validation hard-token loss; its `best_state` holds the trainable
            (Block 2) parameters only.
        before: the validation hard-token metrics at layer L before phase 2's first epoch.
        interval: while an epoch trains, how far it has gone; what a stop signal between two steps leaves
            for the resume (None when the stop came between epochs or during validation).
    """

    stopping: EarlyStoppingState = field(default_factory=lambda: EarlyStoppingState(best_epoch=0))
    before: dict[str, float] | None = None
    interval: EpochSums | None = None  # the epoch under way while training (None between epochs)


def train_phase2(
    model: Backbone,
    train_hard: HardExamples,
    val_hard: HardExamples,
    config: ASHEMConfig,
    optimizer: torch.optim.Optimizer,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    grad_clip: float | None = 1.0,
    seed: int = 0,
    verbose: bool = True,
    state: Phase2State | None = None,
    on_epoch_end: Callable[[int, Phase2State], None] | None = None,
) -> dict[str, Any]:
    """Train Block 2 on `train_hard`'s hard tokens with early stopping on `val_hard`'s hard-token loss.

    Restores the best epoch's trainable weights. Each history row also has the routed validation metrics,
    computed from the validation cache. `on_epoch_end(epoch, state)` runs after every epoch; given such a
    `state` back (with the model's and optimizer's state restored), training carries on from it: epoch e's
    shuffle depends on (seed, e) only.
    """
    k = config.phase1_layers
    loader = create_hard_example_loader(train_hard, batch_size, shuffle=True, seed=seed)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    state = state or Phase2State()
    if state.before is None:
        state.before = evaluate_on_hard_examples(model, val_hard, device, k)

    def train_epoch(epoch: int) -> EpochOutcome:
        loader.set_epoch(epoch)
        if state.interval is None or state.interval.epoch != epoch:
            state.interval = EpochSums(epoch)
        loss = train_upper_layers(model, loader, optimizer, None, device, k, grad_clip, state.interval)
        state.interval = None  # finished: a stop from here on resumes from the epoch's end
        return EpochOutcome({"train_loss": loss}, loader.num_positions)

    def validate() -> Validation:
        hard = evaluate_on_hard_examples(model, val_hard, device, k)
        routed = evaluate_routed_from_cache(model, val_hard, val_hard.threshold, config.confidence, device)
        row = {
            "hard_loss": hard["loss"],
            "hard_ppl": hard["ppl"],
            "hard_acc": hard["acc"],
            "val_loss": routed["loss"],
            "val_ppl": routed["ppl"],
            "val_acc": routed["acc"],
            "shallow_ratio": routed["shallow_ratio"],
            "compute_cost": routed["compute_cost"],
        }
        return Validation(hard["loss"], row)

    def snapshot() -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in trainable.items()}

    @torch.no_grad()
    def restore(best: dict[str, torch.Tensor]) -> None:
        for name, value in best.items():
            trainable[name].copy_(value)

    def describe(row: dict[str, Any]) -> str:
        return (
            f"phase 2 epoch {row['epoch']}: train_hard_loss {row['train_loss']:.4f} val_hard_ppl "
            f"{row['hard_ppl']:.2f} routed val_ppl {row['val_ppl']:.2f}"
        )

    def epoch_end(epoch: int, stopping: EarlyStoppingState) -> None:
        if on_epoch_end is not None:
            on_epoch_end(epoch, state)

    result = fit(
        train_epoch, validate, snapshot, restore, config.max_epochs, config.phase2_patience, 0.0, state.stopping,
        epoch_end, describe if verbose else None,
    )  # fmt: skip
    after = evaluate_on_hard_examples(model, val_hard, device, k)
    return {
        "hard_ppl": after["ppl"],
        "hard_acc": after["acc"],
        "hard_loss": after["loss"],
        "hard_ppl_before": state.before["ppl"],
        "history": result["history"],
        "best_epoch": result["best_epoch"],
        "epochs_run": result["epochs_run"],
        "stopped_early": result["stopped_early"],
        "train_time_s": sum(row["train_time_s"] for row in result["history"]),
        "tokens_per_s": result["tokens_per_s"],
        "num_positions_per_epoch": loader.num_positions,
        "num_hard_tokens_per_epoch": loader.num_hard_tokens,
    }
