"""The whole ASHEM flow (seed 002): phase 1, the threshold and hard examples, growth and freezing, phase 2.

On a pretrained model (`ASHEMConfig.phase1="skip"`) the given L-layer model's layers 1..k are Block 1: phase 1
and the growth are skipped, the threshold comes from its layer k, and phase 2 trains its own layers k+1..L.

Resuming. `run_ashem` reports an `ASHEMProgress` after every epoch of either phase and carries on from one
(`resume=`) with the result of an uninterrupted run. The hard examples are not saved: a phase-2 resume
rebuilds them from Block 1's final weights, which the saved state holds (phase1="train") or which are the
resumed model's own frozen layers 1..k (phase1="skip").
"""

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ease.evaluation import Batch
from ease.model.backbone import Backbone
from ease.model.surgery import freeze_lower_layers, frozen_groups, params_unchanged
from ease.stop import StopRequested
from ease.strategies.ashem.cache import HardExamples, cache_exit_states, confidence_quantile
from ease.strategies.ashem.config import ASHEMConfig
from ease.strategies.ashem.phases import (
    EpochSums,
    Phase2State,
    evaluate_on_hard_examples,
    train_phase1,
    train_phase2,
)
from ease.training.state import EarlyStoppingState, rng_state, set_rng_state
from ease.training.trainer import Trainer

log = logging.getLogger("ease.ashem")


@dataclass
class ASHEMResult:
    """What `run_ashem` produces: the routed model and the record of both phases."""

    model: Backbone  # L layers, routing (k, threshold)
    # phase1="train": Block 1 alone (k layers), as phase 1 left it. phase1="skip": the same object as `model`
    # (the pretrained model was trained in place; its layers 1..k, embedding and head are unchanged).
    phase1_model: Backbone
    threshold: float
    hard_examples: HardExamples  # the source split's cache (threshold set)
    val_examples: HardExamples  # the validation cache at the same threshold
    phase1: dict[str, Any]
    phase2: dict[str, Any]
    final: dict[str, Any]  # Trainer.evaluate on val with the two-stage routing
    frozen_params_unchanged: bool
    eval_trainer: Trainer
    train_time_s: float  # both phases, hard-example collection included; final evaluation excluded
    trained_positions: int  # positions trained on: phase 1 tokens (none if skipped) + positions Block 2 ran over
    state: dict[str, Any] = field(default_factory=dict)  # the finished run's resumable state (`ASHEMProgress.state`)


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
            phase 1 "phase1_train" (`Trainer.training_state`: optimizer, RNGs, early stopping); in
            phase 2 "phase1" (phase 1's record; {"skipped": True, ...} with phase1="skip"), "phase1_model"
            (Block 1's final weights, from which the threshold and hard examples are rebuilt; not stored with
            phase1="skip", where they are the model's own frozen layers 1..k), "threshold" and
            "phase2_train" (optimizer, RNGs, early stopping, the metrics before phase 2).
    """

    phase: int
    phase_epoch: int
    epoch: int
    model: Backbone
    state: dict[str, Any]


def _saved_state(resume: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ASHEM training state of a resume checkpoint; one-line error if it holds none."""
    if resume is None:
        return None
    state = resume.get("train_state")
    if not isinstance(state, dict) or state.get("strategy") != "ashem" or state.get("phase") not in (1, 2):
        raise ValueError("resume: the checkpoint holds no ASHEM training state (saved by another strategy or task?)")
    return state


def _skipped_phase1() -> dict[str, Any]:
    """Phase 1's record when the pretrained model's lower layers are Block 1 (metrics filled in from the cache)."""
    return {
        "metrics": None,
        "history": [],
        "best_epoch": 0,
        "epochs_run": 0,
        "train_time_s": 0.0,
        "tokens_per_s": None,
        "skipped": True,
    }


def _exit_metrics(model: Backbone, cache: HardExamples, device: str | torch.device) -> dict[str, Any]:
    """Block 1's metrics from a cache: every cached token scored at the exit layer (phase 1's "metrics" keys)."""
    k = cache.exit_layer
    every = evaluate_on_hard_examples(model, cache.with_threshold(math.inf), device, k, layer=k)
    row = {key: every[key] for key in ("loss", "ppl", "acc")}
    return {**row, "per_exit": {k: dict(row)}}


def check_resume_mode(config: ASHEMConfig, saved: dict[str, Any] | None) -> None:
    """One-line error when a checkpoint's ASHEM `train_state` is not of this run's `phase1` mode.

    `run_ashem` calls it; an app can call it first, before comparing architectures (a phase1=train
    checkpoint from phase 1 holds a k-layer model, a phase1=skip run an L-layer one).
    """
    if saved is None:
        return
    if config.skip_phase1 and saved["phase"] == 1:
        raise ValueError("resume: the checkpoint is from phase 1 of a phase1=train run, this run is phase1=skip")
    if saved["phase"] == 2:
        was = "skip" if saved.get("phase1", {}).get("skipped") else "train"
        if was != config.phase1:
            raise ValueError(
                f"resume: the checkpoint was saved by a phase1={was} run, this run is phase1={config.phase1}"
            )


def run_ashem(
    config: ASHEMConfig,
    phase1_model: Backbone,
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
    on_stop: Callable[[ASHEMProgress], None] | None = None,
) -> ASHEMResult:
    """The whole seed-002 flow on a fresh `phase1_model` of `config.phase1_layers` layers (or, with
    `config.phase1="skip"`, on a pretrained model of `config.phase2_layers` layers: see below).

    1. Phase 1 trains Block 1 (layers 1..k) on all tokens with early stopping (phase1_lr, phase1_patience).
    2. The threshold is the `hard_example_ratio` quantile of the exit confidences on the source split
       (`hard_examples_from`); the source's layer-k states are cached with the hard mask.
    3. The model is extended to L layers; embedding, Block 1 (and the head unless `phase2_train_head`) are
       frozen and checked bit-identical at the end.
    4. Phase 2 trains Block 2 on the cached hard tokens (phase2_lr, phase2_patience on val hard tokens).
    5. The final model routes at layer k with the threshold; it is evaluated on `val_batches`.

    Resuming: `on_epoch_end` gets an `ASHEMProgress` after every epoch of either phase; its model weights and
    state passed back as `resume` (a checkpoint dict with "model" and "train_state") carry on from there,
    with the same result as an uninterrupted run (bit for bit on CPU). A stop signal (`ease.stop`) that arrives
    while either phase trains calls `on_stop` with the progress at the last optimizer step (its state holds the
    unfinished epoch's position and sums) before `StopRequested` propagates; resuming from it carries on from
    the next step, again bit for bit. A stop during an evaluation calls nothing: the last epoch's progress
    stands. A phase-2 resume skips phase 1 and
    rebuilds the threshold and hard examples from Block 1's saved final weights (deterministic: eval mode,
    the source batches set to the epoch after phase 1's last); a rebuilt threshold that differs from the
    saved one (other data or settings) is an error. `phase1_model` must be freshly built in both cases.

    Pretrained (`config.phase1="skip"`): `phase1_model` is the pretrained L-layer model and its layers 1..k are
    Block 1. Step 1 is skipped (phase 1's record has no epochs, "skipped": True, and its "metrics" are layer
    k's on `val_batches`), step 2 runs on this model's layer k, step 3 freezes it in place without growth, and
    step 4 trains its own layers k+1..L; the result's `model` and `phase1_model` are this same object, and
    `trained_positions` counts phase 2 only. A resume (phase 2 only) loads the checkpoint's weights into it
    first and rebuilds the threshold from its frozen layers 1..k; pass the model as loaded for the original
    run (its weights are replaced).
    """
    k, L = config.phase1_layers, config.phase2_layers
    skip = config.skip_phase1
    if skip and phase1_model.num_layers != L:
        raise ValueError(
            f"phase2_layers: with phase1=skip the pretrained model is the final one, it has "
            f"{phase1_model.num_layers} layers, expected {L}"
        )
    if not skip and phase1_model.num_layers != k:
        raise ValueError(f"phase1_layers: the phase-1 model has {phase1_model.num_layers} layers, expected {k}")
    saved = _saved_state(resume)
    check_resume_mode(config, saved)
    phase = saved["phase"] if saved else 1
    t_start = time.perf_counter()

    # Phase 1: Block 1 on every token (skipped when resuming in phase 2).
    def phase1_epoch_end(epoch: int, state: dict[str, Any]) -> None:
        if on_epoch_end is not None:
            state = {"strategy": "ashem", "phase": 1, "epoch": epoch, "completed": False, **state}
            on_epoch_end(ASHEMProgress(1, epoch, epoch, phase1_model, state))

    def phase1_stop(epoch: int, state: dict[str, Any]) -> None:
        if on_stop is not None:
            state = {"strategy": "ashem", "phase": 1, "epoch": epoch, "completed": False, **state}
            on_stop(ASHEMProgress(1, epoch, epoch, phase1_model, state))

    if phase == 2:
        # Block 1's final weights: phase 1's saved ones, or (skip) the resumed model's frozen layers 1..k.
        phase1_model.load_state_dict(resume["model"] if skip else saved["phase1_model"])
        phase1 = saved["phase1"]
    elif skip:
        phase1 = _skipped_phase1()
    else:
        phase1 = train_phase1(
            config, phase1_model, train_batches, val_batches, device, weight_decay, grad_clip, monitor, progress,
            verbose, resume, phase1_epoch_end, phase1_stop,
        )  # fmt: skip
    trained_positions = sum(row["train_tokens"] for row in phase1["history"])

    if config.hard_examples_from == "val":  # the seed's recipe, kept as an option
        log.warning(
            "ASHEM: hard_examples_from=val mines the hard tokens from the validation data and early-stops phase 2 "
            "on them: validation metrics after phase 2 are in-sample (read the test split)"
        )
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
    if phase1["metrics"] is None:  # skipped phase 1: Block 1's metrics are the pretrained model's at layer k
        phase1["metrics"] = _exit_metrics(phase1_model, val_hard, device)
    log.info(
        "threshold %.4f at layer %d: %d of %d %s tokens hard (%.1f%%, target %.1f%%)",
        threshold, k, hard.num_hard_tokens, hard.num_tokens, config.hard_examples_from, 100 * hard.hard_ratio,
        100 * config.hard_example_ratio,
    )  # fmt: skip

    # Extend (or, skipped phase 1, keep the pretrained model), freeze, phase 2 from the cache.
    model = phase1_model if skip else phase1_model.extended(L)
    model.set_routing(k, threshold)
    snapshot = freeze_lower_layers(model, k, freeze_head=not config.phase2_train_head)  # Block 1's own values
    config2 = config.phase2_config(threshold)
    eval_trainer = Trainer(config2, model.vocab_size, device, grad_clip, progress=progress)
    optimizer2 = eval_trainer.create_optimizer(model, config.phase2_lr, weight_decay)
    hard_ppl_at_exit = evaluate_on_hard_examples(phase1_model, val_hard, device, k, layer=k)["ppl"]
    state2 = Phase2State()
    if phase == 2:
        train2 = saved["phase2_train"]
        if not skip:  # skip: loaded above, before the cache
            model.load_state_dict(resume["model"])
        optimizer2.load_state_dict(train2["optimizer"])
        interval = EpochSums(**train2["interval"]) if train2.get("interval") else None
        state2 = Phase2State(EarlyStoppingState(**train2["early_stopping"]), train2["before"], interval)
        set_rng_state(train2["rng"])  # last: building the model above drew from the RNG

    def phase2_state(state: Phase2State, completed: bool) -> dict[str, Any]:
        stopping = state.stopping
        return {
            "strategy": "ashem",
            "phase": 2,
            "epoch": phase1["epochs_run"] + len(stopping.history),
            "completed": completed,
            "phase1": phase1,
            **({} if skip else {"phase1_model": phase1_model.state_dict()}),
            "threshold": threshold,
            "phase2_train": {
                "optimizer": optimizer2.state_dict(),
                "rng": rng_state(),
                "early_stopping": stopping.to_dict(),
                "before": state.before,
                "interval": None if state.interval is None else dataclasses.asdict(state.interval),
            },
        }

    def phase2_epoch_end(epoch: int, state: Phase2State) -> None:
        if on_epoch_end is not None:
            total = phase1["epochs_run"] + epoch
            on_epoch_end(ASHEMProgress(2, epoch, total, model, phase2_state(state, completed=False)))

    try:
        phase2 = train_phase2(
            model, hard, val_hard, config, optimizer2, batch_size, device, grad_clip, seed, verbose, state2,
            phase2_epoch_end,
        )  # fmt: skip
    except StopRequested:
        if on_stop is not None and state2.interval is not None:  # stopped between two steps of an epoch
            done = len(state2.stopping.history)
            on_stop(ASHEMProgress(2, done, phase1["epochs_run"] + done, model, phase2_state(state2, False)))
        raise
    final_state = phase2_state(state2, completed=True)
    phase2["hard_ppl_at_exit"] = hard_ppl_at_exit
    phase2["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    phase2["frozen_parameters"] = sum(v.numel() for v in snapshot.values())
    phase2["frozen"] = frozen_groups(k, freeze_head=not config.phase2_train_head)
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
