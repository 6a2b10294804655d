"""ASHEM (Adaptive Supervision via Hard Example Mining) on LEGO blocks (seed 002).

Block 1 (layers 1..k) is trained as a standard LM on every token. Its exit confidence (max softmax at layer
k by default) then splits the tokens: the `hard_example_ratio` least confident are "hard". Block 2 (layers
k+1..L) is added on top, the embedding, Block 1 and (by default) the shared norm + head are frozen, and
Block 2 is trained on the hard tokens only. At inference a token exits at layer k when its confidence
reaches the threshold, else it runs to layer L: the two-stage routing of `EarlyExitTransformer`.

Phase 2 never re-runs the frozen block. `cache_exit_states` runs it once over the data and keeps the
layer-k hidden state of every position; phase 2 trains from those tensors. Because the frozen block is
deterministic (it is evaluated in eval mode, no dropout), this gives exactly the loss of re-running it.

Attention context of hard tokens. The cache holds whole windows (every position, easy or hard), and
phase 2 runs Block 2 over the whole window; only the loss is restricted to hard positions. A hard token
therefore attends, in layers k+1..L, to the Block-2 states of all earlier tokens of its window, easy ones
included, just as at inference in counted mode (`routed_forward` and `Trainer.evaluate` run every layer for
every token and only choose which layer's logits score it). Easy tokens thus train Block 2 indirectly, as
context (their keys and values get gradients through the hard tokens' attention), never through their own
loss. Generation with CALM-style state propagation (an exited token's upper-layer keys/values copied from
layer k) gives hard tokens a different context from the one they were trained with; that is a property of
that decoding mode, not of this training.

Resuming. `run_ashem` reports an `ASHEMProgress` after every epoch of either phase and carries on from one
(`resume=`) with the result of an uninterrupted run. The hard examples are not saved: a phase-2 resume
rebuilds them from Block 1's final weights, which the saved state holds.
"""

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ease.checkpoint import load_weights_into, restore_training_state, rng_state, set_rng_state, training_state
from ease.config import StageConfig, TrainingConfig, create_standard_config
from ease.evaluation import Batch
from ease.model import EarlyExitTransformer
from ease.routing import CONFIDENCE_MEASURES, confidence_fn
from ease.trainer import EarlyStoppingState, NonFiniteLossError, Trainer

log = logging.getLogger("ease.ashem")

HARD_EXAMPLE_SOURCES = ("val", "train")


@dataclass
class ASHEMConfig:
    """Settings of the two-phase ASHEM flow (seed 002's fields, plus what the flow needs).

    Attributes:
        phase1_layers: k, the depth of Block 1 and the routing exit layer.
        phase1_lr: learning rate of phase 1 (all of Block 1, embedding and head).
        phase1_patience: early-stopping patience of phase 1 (epochs without improvement).
        hard_example_ratio: share of tokens (lowest confidence first) that count as hard, in (0, 1).
        phase2_layers: L, the depth of the final model; Block 2 is layers k+1..L.
        phase2_lr: learning rate of phase 2 (Block 2 only, unless `phase2_train_head`).
        phase2_patience: early-stopping patience of phase 2, on the hard-token loss of the validation data.
        hard_examples_from: "val" (the seed: threshold and hard tokens from the validation batches) or
            "train". With "val", phase 2 trains on validation tokens, so validation numbers after phase 2
            are in-sample; use the test split (or "train") for an unbiased figure.
        phase2_train_head: also train the shared final norm + output head in phase 2 (the seed leaves the
            head trainable). Off by default: the head is Block 1's exit too, so training it on hard tokens
            would move layer-k confidences away from the threshold computed on them.
        confidence: confidence measure at the exit ("max_prob" is the seed's).
        max_epochs: epoch limit of each phase.
    """

    phase1_layers: int = 2
    phase1_lr: float = 1e-3
    phase1_patience: int = 1
    hard_example_ratio: float = 0.5
    phase2_layers: int = 4
    phase2_lr: float = 1e-4
    phase2_patience: int = 3
    hard_examples_from: str = "val"
    phase2_train_head: bool = False
    confidence: str = "max_prob"
    max_epochs: int = 50

    def __post_init__(self) -> None:
        r = self.hard_example_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r < 1.0:
            raise ValueError(f"hard_example_ratio: must be in (0, 1), got {r}")
        for name in ("phase1_layers", "phase2_layers", "phase1_patience", "phase2_patience", "max_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        if self.phase2_layers <= self.phase1_layers:
            raise ValueError(
                f"phase2_layers: must be > phase1_layers ({self.phase1_layers}) so Block 2 has layers, "
                f"got {self.phase2_layers}"
            )
        for name in ("phase1_lr", "phase2_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {value}")
        if self.hard_examples_from not in HARD_EXAMPLE_SOURCES:
            allowed = ", ".join(HARD_EXAMPLE_SOURCES)
            raise ValueError(f"hard_examples_from: must be one of {allowed}, got {self.hard_examples_from!r}")
        if self.confidence not in CONFIDENCE_MEASURES:
            raise ValueError(f"confidence: must be one of {sorted(CONFIDENCE_MEASURES)}, got {self.confidence!r}")

    @property
    def exit_layer(self) -> int:
        """Tokens are routed at the top of Block 1."""
        return self.phase1_layers

    @property
    def stages(self) -> tuple[StageConfig, StageConfig]:
        """The two LEGO blocks: layers 1..k (loss at k) and k+1..L (loss at L)."""
        k, L = self.phase1_layers, self.phase2_layers
        return StageConfig(layers=(1, k)), StageConfig(layers=(k + 1, L))

    def phase1_config(self) -> TrainingConfig:
        """Phase 1: Block 1 as a standard LM on its last layer, no routing (seed: create_standard_config)."""
        return create_standard_config(self.phase1_layers)

    def phase2_config(self, threshold: float) -> TrainingConfig:
        """Phase 2 and inference: loss on layer L, routing at layer k with the computed threshold."""
        return TrainingConfig(
            stages=[self.stages[1]], exit_layer=self.exit_layer, routing_threshold=threshold, confidence=self.confidence
        )


# --- confidences and the threshold ------------------------------------------------------------------------


def compute_confidence(
    model: EarlyExitTransformer, hidden_state: torch.Tensor, confidence: str = "max_prob"
) -> torch.Tensor:
    """Confidence of the shared exit on a hidden state (seed: max softmax probability). (..., C) -> (...)."""
    return confidence_fn(confidence)(model.unembed(hidden_state))


def confidence_quantile(confidences: torch.Tensor, q: float) -> float:
    """The q-quantile with linear interpolation (as `torch.quantile`), for any number of values.

    `torch.quantile` refuses inputs above 2^24 elements; sorting does not.
    """
    values = confidences.detach().reshape(-1).double().sort().values
    if values.numel() == 0:
        raise ValueError("compute_confidence_threshold: no tokens to compute the threshold from")
    pos = q * (values.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, values.numel() - 1)
    return float(values[lo] + (pos - lo) * (values[hi] - values[lo]))


@dataclass
class HardExamples:
    """Layer-k hidden states of every window of one split, and which tokens are hard.

    Windows are kept whole so Block 2 can attend over every earlier position (see the module docstring).
    Item access (`hard["hidden_states"]`) gives the seed's per-token view: only the hard tokens.

    Attributes:
        inputs: (W, T) input ids.
        targets: (W, T) next-token ids.
        hidden_states: (W, T, C) output of layer `exit_layer`, before the shared norm.
        confidences: (W, T) exit confidence of each position.
        hard_mask: (W, T) True where confidence < threshold (the token routes past the exit).
        threshold: the routing threshold (NaN before one is set).
        exit_layer: k, the layer the states come from.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    hidden_states: torch.Tensor
    confidences: torch.Tensor
    exit_layer: int
    threshold: float = math.nan
    hard_mask: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.hard_mask is None:
            self.hard_mask = torch.zeros_like(self.targets, dtype=torch.bool)

    def with_threshold(self, threshold: float) -> "HardExamples":
        """The same cache with hard = confidence < threshold (tensors are shared, not copied)."""
        return HardExamples(
            self.inputs, self.targets, self.hidden_states, self.confidences, self.exit_layer, float(threshold),
            self.confidences < threshold,
        )  # fmt: skip

    @property
    def num_tokens(self) -> int:
        return self.targets.numel()

    @property
    def num_hard_tokens(self) -> int:
        return int(self.hard_mask.sum().item())

    @property
    def hard_ratio(self) -> float:
        """Measured share of hard tokens."""
        return self.num_hard_tokens / max(self.num_tokens, 1)

    def __getitem__(self, key: str) -> torch.Tensor:
        """Seed 002's dict view: 'inputs', 'hidden_states', 'targets', 'confidences' of the hard tokens only."""
        if key not in ("inputs", "hidden_states", "targets", "confidences"):
            raise KeyError(key)
        return getattr(self, key)[self.hard_mask]


@torch.no_grad()
def cache_exit_states(
    model: EarlyExitTransformer,
    batches: Iterable[Batch],
    exit_layer: int | None = None,
    confidence: str = "max_prob",
    device: str | torch.device = "cpu",
) -> HardExamples:
    """Run layers 1..exit_layer once over `batches` (eval mode) and keep every position's state and confidence.

    The tensors are stored on the CPU: W·T·C floats for the hidden states.
    """
    exit_layer = exit_layer or model.num_layers
    parts: dict[str, list[torch.Tensor]] = {"inputs": [], "targets": [], "hidden_states": [], "confidences": []}
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            x = x.to(device)
            h = model.hidden_states(x, [exit_layer])[exit_layer]  # (B, T, C)
            parts["inputs"].append(x.cpu())
            parts["targets"].append(y.cpu())
            parts["hidden_states"].append(h.float().cpu())
            parts["confidences"].append(compute_confidence(model, h, confidence).cpu())
    finally:
        model.train(was_training)
    if not parts["inputs"]:
        raise ValueError("collect_hard_examples: the batches are empty")
    if len({t.shape[1] for t in parts["inputs"]}) > 1:
        raise ValueError("collect_hard_examples: every batch must have the same sequence length")
    return HardExamples(**{name: torch.cat(chunks) for name, chunks in parts.items()}, exit_layer=exit_layer)


def compute_confidence_threshold(
    model: EarlyExitTransformer,
    val_batches: Iterable[Batch],
    target_ratio: float,
    device: str | torch.device = "cpu",
    exit_layer: int | None = None,
    confidence: str = "max_prob",
) -> float:
    """The confidence below which `target_ratio` of the tokens fall (seed: torch.quantile(conf, ratio)).

    `exit_layer` defaults to the model's last layer (the top of the phase-1 block).
    """
    if not 0.0 < target_ratio < 1.0:
        raise ValueError(f"hard_example_ratio: must be in (0, 1), got {target_ratio}")
    cache = cache_exit_states(model, val_batches, exit_layer, confidence, device)
    return confidence_quantile(cache.confidences, target_ratio)


def collect_hard_examples(
    model: EarlyExitTransformer,
    batches: Iterable[Batch],
    threshold: float,
    device: str | torch.device = "cpu",
    exit_layer: int | None = None,
    confidence: str = "max_prob",
) -> HardExamples:
    """The tokens whose exit confidence is below `threshold`: inputs, layer-k hidden states, targets, confidences."""
    return cache_exit_states(model, batches, exit_layer, confidence, device).with_threshold(threshold)


# --- phase-2 batches and loss -------------------------------------------------------------------------------

HardBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden (B, T, C), targets (B, T), hard mask (B, T)


class HardExampleBatches:
    """Re-iterable batches of the windows that hold at least one hard token, reshuffled every epoch.

    `batch_size` counts windows (sequences), like `TokenBatches`; each yields (hidden, targets, hard_mask).
    """

    def __init__(self, hard: HardExamples, batch_size: int = 64, shuffle: bool = True, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        keep = hard.hard_mask.any(dim=1).nonzero().squeeze(1)  # windows with a hard token
        if keep.numel() == 0:
            raise ValueError("create_hard_example_loader: no hard tokens (raise hard_example_ratio)")
        self.hidden = hard.hidden_states[keep]
        self.targets = hard.targets[keep]
        self.mask = hard.hard_mask[keep]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    @property
    def num_hard_tokens(self) -> int:
        return int(self.mask.sum().item())

    @property
    def num_positions(self) -> int:
        """Positions Block 2 runs over per epoch (hard tokens and their context)."""
        return self.mask.numel()

    def __len__(self) -> int:
        return -(-self.hidden.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[HardBatch]:
        n = self.hidden.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        else:
            order = torch.arange(n)
        self.epoch += 1
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.hidden[index], self.targets[index], self.mask[index]


def create_hard_example_loader(
    hard_examples: HardExamples, batch_size: int = 64, shuffle: bool = True, seed: int = 0
) -> HardExampleBatches:
    """Batches of the cached windows that contain hard tokens (seed 002)."""
    return HardExampleBatches(hard_examples, batch_size, shuffle, seed)


def upper_layer_logits(
    model: EarlyExitTransformer, hidden: torch.Tensor, mask: torch.Tensor, num_lower_layers: int
) -> torch.Tensor:
    """Run layers k+1..L on cached layer-k states (all positions, for context); logits at masked positions.

    hidden (B, T, C), mask (B, T) -> (n_masked, V).
    """
    top = model.run_layers(hidden, num_lower_layers, model.num_layers)  # (B, T, C)
    return model.unembed(top[mask])  # (n, V): the head only where the loss is


def train_upper_layers(
    model: EarlyExitTransformer,
    hard_batches: Iterable[HardBatch],
    optimizer: torch.optim.Optimizer,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    num_lower_layers: int = 2,
    grad_clip: float | None = 1.0,
) -> float:
    """One epoch of Block 2 on the hard tokens, from cached states; returns the mean hard-token loss."""
    if vocab_size is not None and vocab_size != model.vocab_size:
        raise ValueError(f"vocab_size: {vocab_size} does not match the model's {model.vocab_size}")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    total, count = 0.0, 0
    for hidden, targets, mask in hard_batches:
        hidden, targets, mask = hidden.to(device), targets.to(device), mask.to(device)
        n = int(mask.sum().item())
        if n == 0:
            continue
        logits = upper_layer_logits(model, hidden, mask, num_lower_layers)
        loss = F.cross_entropy(logits.float(), targets[mask])
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite phase-2 loss ({loss.item()})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        total += loss.item() * n
        count += n
    if count == 0:
        raise ValueError("train_upper_layers: no hard tokens in the batches")
    return total / count


def _nll_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    nll = F.cross_entropy(logits.float(), targets, reduction="sum").item()
    return nll, int((logits.argmax(-1) == targets).sum().item())


def _summary(nll: float, correct: int, n: int) -> dict[str, float]:
    loss = nll / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "acc": correct / max(n, 1), "num_tokens": n}


@torch.no_grad()
def evaluate_on_hard_examples(
    model: EarlyExitTransformer,
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
    layer = model.num_layers if layer is None else layer
    was_training = model.training
    model.eval()
    nll, correct, n = 0.0, 0, 0
    try:
        for hidden, targets, mask in HardExampleBatches(hard_examples, batch_size, shuffle=False):
            hidden, targets, mask = hidden.to(device), targets.to(device), mask.to(device)
            top = model.run_layers(hidden, k, layer) if layer > k else hidden
            b_nll, b_correct = _nll_stats(model.unembed(top[mask]), targets[mask])
            nll, correct, n = nll + b_nll, correct + b_correct, n + int(mask.sum().item())
    finally:
        model.train(was_training)
    return _summary(nll, correct, n)


@torch.no_grad()
def evaluate_routed_from_cache(
    model: EarlyExitTransformer,
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
            final_logits = model.unembed(model.run_layers(hidden, k, L)).reshape(targets.numel(), -1)
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


# --- extending and freezing ---------------------------------------------------------------------------------


def extend_model(
    model: EarlyExitTransformer, num_layers: int, exit_layer: int | None = None, routing_threshold: float = 0.0
) -> EarlyExitTransformer:
    """A deeper copy: same architecture with `num_layers` blocks; embedding, the first blocks, the shared norm
    and head copied from `model`, the new blocks freshly initialised (residual projections near zero, so the
    new blocks start close to the identity)."""
    if num_layers <= model.num_layers:
        raise ValueError(f"phase2_layers: must be > the model's {model.num_layers} layers, got {num_layers}")
    args = model.config_dict()
    args.update(num_layers=num_layers, exit_layer=exit_layer or model.num_layers, routing_threshold=routing_threshold)
    device = next(model.parameters()).device
    extended = EarlyExitTransformer(**args).to(device)
    extended.embedding.load_state_dict(model.embedding.state_dict())
    for i in range(model.num_layers):
        extended.layers[i].load_state_dict(model.layers[i].state_dict())
    extended.norm.load_state_dict(model.norm.state_dict())
    extended.output_head.load_state_dict(model.output_head.state_dict())
    return extended


def freeze_lower_layers(
    model: EarlyExitTransformer, num_lower_layers: int, freeze_head: bool = True
) -> dict[str, torch.Tensor]:
    """Freeze the embedding and layers 1..num_lower_layers (and the shared norm + head if `freeze_head`).

    Returns a copy of every frozen parameter, for `params_unchanged`.
    """
    modules: list[nn.Module] = [model.embedding, *model.layers[:num_lower_layers]]
    if freeze_head:
        modules += [model.norm, model.output_head]
    frozen = {id(p) for m in modules for p in m.parameters()}
    snapshot = {}
    for name, p in model.named_parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
            snapshot[name] = p.detach().clone()
    if model.tie_weights and not freeze_head:
        log.warning("tie_weights: the output head is the frozen embedding, so the head stays frozen too")
    return snapshot


def params_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    """True when every parameter in `snapshot` is bit-identical to its copy."""
    params = dict(model.named_parameters())
    return all(torch.equal(params[name].detach(), value) for name, value in snapshot.items())


# --- the flow -------------------------------------------------------------------------------------------------


@dataclass
class ASHEMResult:
    """What `run_ashem` produces: the routed model and the record of both phases."""

    model: EarlyExitTransformer  # L layers, routing (k, threshold)
    phase1_model: EarlyExitTransformer  # Block 1 alone, as phase 1 left it
    threshold: float
    hard_examples: HardExamples  # the source split's cache (threshold set)
    val_examples: HardExamples  # the validation cache at the same threshold
    phase1: dict[str, Any]
    phase2: dict[str, Any]
    final: dict[str, Any]  # Trainer.evaluate on val with the two-stage routing
    frozen_params_unchanged: bool
    eval_trainer: Trainer
    train_time_s: float  # both phases, hard-example collection included; final evaluation excluded
    trained_positions: int  # positions trained on (phase 1 tokens + positions Block 2 ran over)
    state: dict[str, Any] = field(default_factory=dict)  # the finished run's resumable state (`ASHEMProgress.state`)


@dataclass
class Phase2State:
    """Where phase 2 stands: enough, with the model's and optimizer's state, to carry on after a restart.

    Attributes:
        stopping: early stopping on the validation hard-token loss; its `best_state` holds the trainable
            (Block 2) parameters only.
        before: the validation hard-token metrics at layer L before phase 2's first epoch.
    """

    stopping: EarlyStoppingState = field(default_factory=lambda: EarlyStoppingState(best_epoch=0))
    before: dict[str, float] | None = None


@dataclass
class ASHEMProgress:
    """A point `run_ashem` can resume from, handed to its `on_epoch_end` after every epoch of either phase.

    `{"model": progress.model.state_dict(), "train_state": progress.state}` (what
    `save_checkpoint(path, progress.model, train_state=progress.state)` writes, among other keys) passed back
    as `run_ashem(..., resume=...)` carries on from this point. The tensors in `state` are the live ones:
    save them at once, do not keep them.

    Attributes:
        phase: 1 (Block 1 on every token) or 2 (Block 2 on the hard tokens).
        phase_epoch: epochs done in this phase.
        epoch: epochs done in both phases (phase 1's, then phase 2's), as the run's history numbers them.
        model: the model being trained: Block 1 alone (k layers) in phase 1, the routed L-layer model in phase 2.
        state: everything else a resume needs: "strategy" ("ashem"), "phase", "epoch", "completed", and in
            phase 1 "phase1_train" (`ease.checkpoint.training_state`: optimizer, RNGs, early stopping); in
            phase 2 "phase1" (phase 1's record), "phase1_model" (Block 1's final weights, from which the
            threshold and hard examples are rebuilt), "threshold" and "phase2_train" (optimizer, RNGs,
            early stopping, the metrics before phase 2).
    """

    phase: int
    phase_epoch: int
    epoch: int
    model: EarlyExitTransformer
    state: dict[str, Any]


def train_phase1(
    config: ASHEMConfig,
    model: EarlyExitTransformer,
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
) -> dict[str, Any]:
    """Phase 1: Block 1 on every token with early stopping; returns its record (val metrics, history, ...).

    `on_epoch_end(epoch, state)` gets {"phase1_train": training state} after every epoch; `resume` (the
    model's weights under "model" and such a state under "train_state") carries on from that epoch.
    """
    trainer = Trainer(config.phase1_config(), model.vocab_size, device, grad_clip, progress=progress)
    optimizer = trainer.create_optimizer(model, config.phase1_lr, weight_decay)
    stopping = EarlyStoppingState()
    if resume is not None:
        load_weights_into(model, resume, "resume")
        stopping = restore_training_state(resume["train_state"]["phase1_train"], trainer, optimizer)

    def epoch_end(epoch: int, stopping: EarlyStoppingState) -> None:
        if on_epoch_end is not None:
            on_epoch_end(epoch, {"phase1_train": training_state(trainer, optimizer, stopping, completed=False)})

    result = trainer.train_with_early_stopping(
        model, train_batches, val_batches, optimizer, config.max_epochs, config.phase1_patience, verbose, monitor,
        state=stopping, on_epoch_end=epoch_end,
    )  # fmt: skip
    ev = trainer.evaluate(model, val_batches)
    return {
        "metrics": {key: ev[key] for key in ("ppl", "acc", "loss", "per_exit")},
        "history": result["history"],
        "best_epoch": result["best_epoch"],
        "epochs_run": result["epochs_run"],
        "train_time_s": result["train_time_s"],
        "tokens_per_s": result["tokens_per_s"],
    }


def train_phase2(
    model: EarlyExitTransformer,
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
    stopping = state.stopping
    if state.before is None:
        state.before = evaluate_on_hard_examples(model, val_hard, device, k)
    loader.epoch = len(stopping.history)
    for epoch in range(len(stopping.history) + 1, config.max_epochs + 1):
        if stopping.bad_epochs >= config.phase2_patience:  # a resumed run that had already stopped
            break
        t0 = time.perf_counter()
        train_loss = train_upper_layers(model, loader, optimizer, None, device, k, grad_clip)
        seconds = time.perf_counter() - t0
        hard = evaluate_on_hard_examples(model, val_hard, device, k)
        routed = evaluate_routed_from_cache(model, val_hard, val_hard.threshold, config.confidence, device)
        improved = math.isfinite(hard["loss"]) and hard["loss"] < stopping.best_metric
        stopping.history.append({
            "epoch": epoch,
            "train_loss": train_loss,
            "hard_loss": hard["loss"],
            "hard_ppl": hard["ppl"],
            "hard_acc": hard["acc"],
            "val_loss": routed["loss"],
            "val_ppl": routed["ppl"],
            "val_acc": routed["acc"],
            "shallow_ratio": routed["shallow_ratio"],
            "compute_cost": routed["compute_cost"],
            "train_time_s": seconds,
            "tokens_per_s": loader.num_positions / seconds if seconds > 0 else None,
            "improved": improved,
        })  # fmt: skip
        if improved:
            stopping.best_metric, stopping.best_epoch, stopping.bad_epochs = hard["loss"], epoch, 0
            stopping.best_state = {name: p.detach().clone() for name, p in trainable.items()}
        else:
            stopping.bad_epochs += 1
        if verbose:
            log.info(
                "phase 2 epoch %d: train_hard_loss %.4f val_hard_ppl %.2f routed val_ppl %.2f%s",
                epoch, train_loss, hard["ppl"], routed["ppl"], " *" if improved else "",
            )  # fmt: skip
        if on_epoch_end is not None:
            on_epoch_end(epoch, state)
    if stopping.best_state is not None:
        with torch.no_grad():
            for name, value in stopping.best_state.items():
                trainable[name].copy_(value)
    after = evaluate_on_hard_examples(model, val_hard, device, k)
    history = stopping.history
    train_seconds = sum(row["train_time_s"] for row in history)
    return {
        "hard_ppl": after["ppl"],
        "hard_acc": after["acc"],
        "hard_loss": after["loss"],
        "hard_ppl_before": state.before["ppl"],
        "history": history,
        "best_epoch": stopping.best_epoch,
        "epochs_run": len(history),
        "stopped_early": stopping.bad_epochs >= config.phase2_patience,
        "train_time_s": train_seconds,
        "tokens_per_s": loader.num_positions * len(history) / train_seconds if train_seconds > 0 else None,
        "num_positions_per_epoch": loader.num_positions,
        "num_hard_tokens_per_epoch": loader.num_hard_tokens,
    }


def _saved_state(resume: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ASHEM training state of a resume checkpoint; one-line error if it holds none."""
    if resume is None:
        return None
    state = resume.get("train_state")
    if not isinstance(state, dict) or state.get("strategy") != "ashem" or state.get("phase") not in (1, 2):
        raise ValueError("resume: the checkpoint holds no ASHEM training state (saved by another strategy or task?)")
    return state


def run_ashem(
    config: ASHEMConfig,
    phase1_model: EarlyExitTransformer,
    train_batches: Iterable[Batch],
    val_batches: Iterable[Batch],
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    monitor: str = "loss",
    analysis_thresholds: Iterable[float] | None = None,
    seed: int = 0,
    progress: bool = False,
    verbose: bool = True,
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[ASHEMProgress], None] | None = None,
) -> ASHEMResult:
    """The whole seed-002 flow on a fresh `phase1_model` of `config.phase1_layers` layers.

    1. Phase 1 trains Block 1 (layers 1..k) on all tokens with early stopping (phase1_lr, phase1_patience).
    2. The threshold is the `hard_example_ratio` quantile of the exit confidences on the source split
       (`hard_examples_from`); the source's layer-k states are cached with the hard mask.
    3. The model is extended to L layers; embedding, Block 1 (and the head unless `phase2_train_head`) are
       frozen and checked bit-identical at the end.
    4. Phase 2 trains Block 2 on the cached hard tokens (phase2_lr, phase2_patience on val hard tokens).
    5. The final model routes at layer k with the threshold; it is evaluated on `val_batches`.

    Resuming: `on_epoch_end` gets an `ASHEMProgress` after every epoch of either phase; its model weights and
    state passed back as `resume` (a checkpoint dict with "model" and "train_state") carry on from there,
    with the same result as an uninterrupted run (bit for bit on CPU). A phase-2 resume skips phase 1 and
    rebuilds the threshold and hard examples from Block 1's saved final weights (deterministic: eval mode,
    the source batches set to the epoch after phase 1's last); a rebuilt threshold that differs from the
    saved one (other data or settings) is an error. `phase1_model` must be freshly built in both cases.
    """
    k, L = config.phase1_layers, config.phase2_layers
    if phase1_model.num_layers != k:
        raise ValueError(f"phase1_layers: the phase-1 model has {phase1_model.num_layers} layers, expected {k}")
    saved = _saved_state(resume)
    phase = saved["phase"] if saved else 1
    t_start = time.perf_counter()

    # Phase 1: Block 1 on every token (skipped when resuming in phase 2).
    def phase1_epoch_end(epoch: int, state: dict[str, Any]) -> None:
        if on_epoch_end is not None:
            state = {"strategy": "ashem", "phase": 1, "epoch": epoch, "completed": False, **state}
            on_epoch_end(ASHEMProgress(1, epoch, epoch, phase1_model, state))

    if phase == 1:
        phase1 = train_phase1(
            config, phase1_model, train_batches, val_batches, device, weight_decay, grad_clip, monitor, progress,
            verbose, resume, phase1_epoch_end,
        )  # fmt: skip
    else:
        phase1_model.load_state_dict(saved["phase1_model"])
        phase1 = saved["phase1"]
    trained_positions = sum(row["train_tokens"] for row in phase1["history"])

    # Threshold and hard examples, from one pass of the frozen block over the source split.
    source = val_batches if config.hard_examples_from == "val" else train_batches
    if hasattr(source, "set_epoch"):
        # The window order phase 1 would iterate next: fixed here so a resumed run caches the same order.
        source.set_epoch(phase1["epochs_run"])
    cache = cache_exit_states(phase1_model, source, k, config.confidence, device)
    threshold = confidence_quantile(cache.confidences, config.hard_example_ratio)
    threshold = min(max(threshold, math.ulp(0.0)), 1.0)  # 0 would switch routing off
    if phase == 2 and threshold != saved["threshold"]:
        raise ValueError(
            f"resume: the threshold rebuilt from the checkpoint's Block 1 is {threshold}, the checkpoint has "
            f"{saved['threshold']} (the data or settings changed?)"
        )
    hard = cache.with_threshold(threshold)
    if config.hard_examples_from == "val":
        val_hard = hard
    else:
        val_hard = cache_exit_states(phase1_model, val_batches, k, config.confidence, device).with_threshold(threshold)
    log.info(
        "threshold %.4f at layer %d: %d of %d %s tokens hard (%.1f%%, target %.1f%%)",
        threshold, k, hard.num_hard_tokens, hard.num_tokens, config.hard_examples_from, 100 * hard.hard_ratio,
        100 * config.hard_example_ratio,
    )  # fmt: skip

    # Extend, freeze, phase 2 from the cache.
    model = extend_model(phase1_model, L, exit_layer=k, routing_threshold=threshold)
    snapshot = freeze_lower_layers(model, k, freeze_head=not config.phase2_train_head)  # Block 1's own values
    config2 = config.phase2_config(threshold)
    eval_trainer = Trainer(config2, model.vocab_size, device, grad_clip, progress=progress)
    optimizer2 = eval_trainer.create_optimizer(model, config.phase2_lr, weight_decay)
    hard_ppl_at_exit = evaluate_on_hard_examples(phase1_model, val_hard, device, k, layer=k)["ppl"]
    state2 = Phase2State()
    if phase == 2:
        train2 = saved["phase2_train"]
        load_weights_into(model, resume, "resume")
        optimizer2.load_state_dict(train2["optimizer"])
        state2 = Phase2State(EarlyStoppingState(**train2["early_stopping"]), train2["before"])
        set_rng_state(train2["rng"])  # last: building the model above drew from the RNG

    def phase2_state(state: Phase2State, completed: bool) -> dict[str, Any]:
        stopping = state.stopping
        return {
            "strategy": "ashem",
            "phase": 2,
            "epoch": phase1["epochs_run"] + len(stopping.history),
            "completed": completed,
            "phase1": phase1,
            "phase1_model": phase1_model.state_dict(),
            "threshold": threshold,
            "phase2_train": {
                "optimizer": optimizer2.state_dict(),
                "rng": rng_state(),
                "early_stopping": {f: getattr(stopping, f) for f in EarlyStoppingState.__dataclass_fields__},
                "before": state.before,
            },
        }

    def phase2_epoch_end(epoch: int, state: Phase2State) -> None:
        if on_epoch_end is not None:
            total = phase1["epochs_run"] + epoch
            on_epoch_end(ASHEMProgress(2, epoch, total, model, phase2_state(state, completed=False)))

    phase2 = train_phase2(
        model, hard, val_hard, config, optimizer2, batch_size, device, grad_clip, seed, verbose, state2,
        phase2_epoch_end,
    )  # fmt: skip
    final_state = phase2_state(state2, completed=True)
    phase2["hard_ppl_at_exit"] = hard_ppl_at_exit
    phase2["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    phase2["frozen_parameters"] = sum(v.numel() for v in snapshot.values())
    phase2["frozen"] = ["embedding", *(f"layer_{i}" for i in range(1, k + 1))]
    phase2["frozen"] += [] if config.phase2_train_head else ["norm", "output_head"]
    trained_positions += phase2["num_positions_per_epoch"] * phase2["epochs_run"]
    unchanged = params_unchanged(model, snapshot)
    if not unchanged:
        log.error("frozen parameters changed during phase 2")
    for p in model.parameters():  # the returned model is a normal, trainable module again
        p.requires_grad_(True)

    train_time = time.perf_counter() - t_start
    thresholds = sorted({*(analysis_thresholds or ()), threshold})
    t_eval = time.perf_counter()
    final = eval_trainer.evaluate(model, val_batches, thresholds=thresholds)
    final["eval_time_s"] = time.perf_counter() - t_eval
    return ASHEMResult(
        model=model,
        phase1_model=phase1_model,
        threshold=threshold,
        hard_examples=hard,
        val_examples=val_hard,
        phase1=phase1,
        phase2=phase2,
        final=final,
        frozen_params_unchanged=unchanged,
        eval_trainer=eval_trainer,
        train_time_s=train_time,
        trained_positions=trained_positions,
        state=final_state,
    )
