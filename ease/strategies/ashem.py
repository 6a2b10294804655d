"""strategy=ashem: the Hydra edge of `ease.ashem.run_ashem` (seed 002).

Keys it reads: strategy.* (ASHEMConfig's fields), model.* (architecture; model.num_layers must equal
strategy.phase2_layers), train.max_epochs (each phase), train.batch_size, train.weight_decay,
train.grad_clip, train.monitor (phase 1), routing.confidence, routing.analysis_thresholds, seed, device.
train.lr and train.patience are not used (phase1_lr/phase2_lr, phase1_patience/phase2_patience are).

checkpoint.pt is rewritten at every epoch end of both phases (Block 1 in phase 1, the routed model in phase
2) and `resume=true` carries on inside the phase it was in; the kill hook counts epochs across the phases.
"""

import dataclasses
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ease.ashem import ASHEMConfig, run_ashem
from ease.model import EarlyExitTransformer
from ease.strategies import report
from ease.strategies.resume import EpochCheckpoints, architecture, check_architecture, load_for_resume
from ease.trainer import Trainer

log = logging.getLogger("ease.strategies.ashem")

# ASHEMConfig fields that are not under strategy.* in the app.
_KEYS = {"confidence": "routing.confidence", "max_epochs": "train.max_epochs"}


def ashem_config(cfg: DictConfig) -> ASHEMConfig:
    """ASHEMConfig from strategy.*; errors name the Hydra key."""
    s = cfg.strategy
    try:
        return ASHEMConfig(
            phase1_layers=s.phase1_layers,
            phase1_lr=s.phase1_lr,
            phase1_patience=s.phase1_patience,
            hard_example_ratio=s.hard_example_ratio,
            phase2_layers=s.phase2_layers,
            phase2_lr=s.phase2_lr,
            phase2_patience=s.phase2_patience,
            hard_examples_from=s.hard_examples_from,
            phase2_train_head=s.phase2_train_head,
            confidence=cfg.routing.confidence,
            max_epochs=cfg.train.max_epochs,
        )
    except ValueError as err:
        message = str(err)
        name = message.split(":", 1)[0]
        key = _KEYS.get(name, f"strategy.{name}")
        raise ValueError(key + message[len(name) :].replace("phase1_layers (", "strategy.phase1_layers (")) from None


def validate(cfg: DictConfig) -> None:
    """Bad ASHEM settings fail here, before any data is read."""
    config = ashem_config(cfg)
    L = cfg.model.num_layers
    if config.phase2_layers != L:
        raise ValueError(
            f"strategy.phase2_layers: must equal model.num_layers ({L}), the final model's depth, got "
            f"{config.phase2_layers} (+preset=ashem ties them)"
        )
    if cfg.routing.kind == "confidence":
        exit_layer = OmegaConf.to_container(cfg.routing, resolve=True)["exit_layer"]
        if isinstance(exit_layer, list) and len(exit_layer) == 1:
            exit_layer = exit_layer[0]
        if not isinstance(exit_layer, int) or not 1 <= exit_layer < L:
            raise ValueError(
                f"routing.exit_layer: must be one layer in 1..{L - 1} for a {L}-layer model, got {exit_layer}"
            )
        if exit_layer != config.exit_layer:
            raise ValueError(
                f"routing.exit_layer: ASHEM routes at the top of Block 1, strategy.phase1_layers={config.exit_layer}, "
                f"got {exit_layer}"
            )
    if cfg.loss_weights.kind != "final_only":
        raise ValueError(
            "loss_weights.kind: ASHEM trains each block on its last layer; leave it final_only, "
            f"got {cfg.loss_weights.kind!r}"
        )
    if cfg.schedule.kind != "constant":
        raise ValueError(f"schedule.kind: ASHEM has no α to schedule; use constant, got {cfg.schedule.kind!r}")
    if cfg.lr_scales.kind != "uniform":
        raise ValueError(
            f"lr_scales.kind: ASHEM sets each phase's rate with strategy.phase1_lr/phase2_lr; use uniform, "
            f"got {cfg.lr_scales.kind!r}"
        )


def run(cfg: DictConfig, data: Any, output_dir: Path) -> dict[str, Any]:
    """Both phases, the routed evaluation (val, and test when there is one), checkpoint.pt; returns metrics."""
    config = ashem_config(cfg)
    k, L = config.phase1_layers, config.phase2_layers
    m = cfg.model
    phase1_model = EarlyExitTransformer(
        data.vocab_size, m.dim, k, m.num_heads, exit_layer=k, routing_threshold=0.0, hidden_dim=m.hidden_dim,
        dropout=m.dropout, tie_weights=m.tie_weights, confidence=cfg.routing.confidence,
    ).to(cfg.device)  # fmt: skip
    log.info("ASHEM: phase 1 trains layers 1-%d, phase 2 layers %d-%d; routing at layer %d", k, k + 1, L, k)
    ckpt_path = output_dir / "checkpoint.pt"
    ckpt = load_for_resume(cfg, ckpt_path, "ashem")
    if ckpt is not None:
        state = ckpt["train_state"]
        check_architecture(ckpt, ckpt_path, architecture(phase1_model, num_layers=k if state["phase"] == 1 else L))
        log.info("resumed from %s after epoch %d (ASHEM phase %d)", ckpt_path, state["epoch"], state["phase"])
    checkpoints = EpochCheckpoints(cfg, ckpt_path, data.tokenizer.to_dict())
    r = run_ashem(
        config, phase1_model, data.train, data.val, cfg.device, cfg.train.batch_size, cfg.train.weight_decay,
        cfg.train.grad_clip, cfg.train.monitor, list(cfg.routing.analysis_thresholds), cfg.seed, cfg.progress,
        resume=ckpt, on_epoch_end=lambda p: checkpoints(p.model, p.state, p.epoch),
    )  # fmt: skip

    metrics = dict(r.final)
    test = report.evaluate_test_split(r.eval_trainer, r.model, data)
    if test is not None:
        metrics["test"] = test
    p1, p2 = r.phase1, r.phase2
    history = [{**row, "phase": 1, "phase_epoch": row["epoch"]} for row in p1["history"]]
    offset = len(history)
    for row in p2["history"]:
        history.append(
            {**row, "epoch": offset + row["epoch"], "phase": 2, "phase_epoch": row["epoch"], "weights": {L: 1.0}}
        )
    train_seconds = sum(row["train_time_s"] for row in p1["history"]) + p2["train_time_s"]
    metrics.update(
        history=history,
        best_epoch=offset + p2["best_epoch"],
        epochs_run=len(history),
        train_time_s=r.train_time_s,
        tokens_per_s=r.trained_positions / train_seconds if train_seconds > 0 else None,
        num_parameters=r.model.num_parameters(),
        layer_weights=r.eval_trainer.config.weights_for(L),
        data_source=data.source,
        vocab_size=data.vocab_size,
    )
    phase1 = dict(p1)
    if data.test is not None:
        phase1["test"] = report.evaluate_test_split(
            Trainer(config.phase1_config(), device=cfg.device), r.phase1_model, data
        )
    phase2 = dict(p2)
    phase2.update(
        monitor="hard-token loss on the validation data at the threshold (early stopping, patience "
        f"{config.phase2_patience})",
        in_sample=config.hard_examples_from == "val",
        from_cached_hidden_states=True,
    )
    metrics["strategy"] = {
        "name": "ashem",
        "config": dataclasses.asdict(config),
        "stages": [list(stage.layers) for stage in config.stages],
        "phase1": phase1,
        "threshold": r.threshold,
        "exit_layer": k,
        "hard_example_ratio": config.hard_example_ratio,
        "hard_ratio": r.hard_examples.hard_ratio,
        "hard_examples_from": config.hard_examples_from,
        "num_hard_tokens": r.hard_examples.num_hard_tokens,
        "num_source_tokens": r.hard_examples.num_tokens,
        "val_hard_ratio": r.val_examples.hard_ratio,
        "phase2": phase2,
        "frozen_params_unchanged": r.frozen_params_unchanged,
        "final": report.headline(metrics),
    }
    if test is not None:
        metrics["strategy"]["final"]["test"] = report.headline(test)
    report.save(
        cfg, output_dir, r.model, data, metrics,
        strategy={"name": "ashem", "exit_layer": k, "threshold": r.threshold}, train_state=r.state,
    )  # fmt: skip
    return metrics
