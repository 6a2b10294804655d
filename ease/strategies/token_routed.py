"""strategy=token_routed: the Hydra edge of `ease.token_routed` (seed 000's TokenRoutedTransformer).

Keys it reads: routing.* (kind must be confidence; one exit_layer and one threshold: the two routes),
strategy.min_route_fraction (the collapse guard), model.*, lr_scales.*, train.*, seed, device.
loss_weights must stay final_only and schedule constant: the routes, not weights, decide each token's loss.

checkpoint.pt is rewritten at every epoch end (with the route statistics so far) and `resume=true` carries on
from it, as for strategy=standard.
"""

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ease.app import build
from ease.config import TrainingConfig
from ease.strategies import report
from ease.strategies.resume import EpochCheckpoints, architecture, check_architecture, load_for_resume
from ease.token_routed import TokenRoutedTrainer, TokenRoutedTransformer, check_min_route_fraction, token_routed_config
from ease.trainer import EarlyStoppingState

log = logging.getLogger("ease.strategies.token_routed")


def min_route_fraction(cfg: DictConfig) -> float:
    try:
        return check_min_route_fraction(cfg.strategy.min_route_fraction)
    except ValueError as err:
        raise ValueError(f"strategy.{err}") from None


def training_config(cfg: DictConfig) -> TrainingConfig:
    """The TokenRoutedTrainer's config; errors name the Hydra key."""
    if cfg.routing.kind != "confidence":
        raise ValueError(
            f"routing.kind: token_routed routes tokens by confidence; use routing=confidence, got {cfg.routing.kind!r}"
        )
    if cfg.loss_weights.kind != "final_only":
        raise ValueError(
            "loss_weights.kind: token_routed scores each token at its own route, so there are no weights to set; "
            f"leave it final_only, got {cfg.loss_weights.kind!r}"
        )
    if cfg.schedule.kind != "constant":
        raise ValueError(f"schedule.kind: token_routed has no α to schedule; use constant, got {cfg.schedule.kind!r}")
    base = build.training_config(cfg)  # routing, LR scales and their ranges, with Hydra key names
    if len(base.exit_layers) != 1:
        raise ValueError(f"routing.exit_layer: token_routed takes one exit layer, got {list(base.exit_layers)}")
    return token_routed_config(
        cfg.model.num_layers,
        base.exit_layers[0],
        base.routing_thresholds[0],
        base.layer_lr_scales,
        base.confidence,
        embedding_lr_scale=base.embedding_lr_scale,
        head_lr_scale=base.head_lr_scale,
    )


def validate(cfg: DictConfig) -> None:
    training_config(cfg)
    min_route_fraction(cfg)


def run(cfg: DictConfig, data: Any, output_dir: Path) -> dict[str, Any]:
    """Token-routed training with early stopping, routed evaluation, checkpoint.pt; returns metrics."""
    config = training_config(cfg)
    fraction = min_route_fraction(cfg)
    m = cfg.model
    exit_layer, threshold = config.exit_layers[0], config.routing_thresholds[0]
    model = TokenRoutedTransformer(
        data.vocab_size, m.dim, m.num_layers, m.num_heads, exit_layer, threshold, fraction,
        hidden_dim=m.hidden_dim, dropout=m.dropout, tie_weights=m.tie_weights, confidence=config.confidence,
    ).to(cfg.device)  # fmt: skip
    trainer = TokenRoutedTrainer(
        config, data.vocab_size, cfg.device, cfg.train.grad_clip, fraction, progress=cfg.progress
    )
    optimizer = trainer.create_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    ckpt_path = output_dir / "checkpoint.pt"
    stopping = EarlyStoppingState()
    ckpt = load_for_resume(cfg, ckpt_path, "token_routed")
    if ckpt is not None:
        check_architecture(ckpt, ckpt_path, architecture(model))
        model.load_state_dict(ckpt["model"])
        stopping = trainer.restore_training_state(ckpt["train_state"], optimizer)
        log.info("resumed from %s after epoch %d", ckpt_path, len(stopping.history))
    checkpoints = EpochCheckpoints(cfg, ckpt_path, data.tokenizer.to_dict())

    def on_epoch_end(epoch: int, stopping: EarlyStoppingState) -> None:
        checkpoints(model, trainer.training_state(optimizer, stopping, completed=False), epoch)

    result = trainer.train_with_early_stopping(
        model, data.train, data.val, optimizer, cfg.train.max_epochs, cfg.train.patience, True, cfg.train.monitor,
        state=stopping, on_epoch_end=on_epoch_end,
    )  # fmt: skip
    metrics = report.final_metrics(trainer, model, data, result, list(cfg.routing.analysis_thresholds))
    best = result["best_epoch"]
    metrics["strategy"] = {
        "name": "token_routed",
        "exit_layer": exit_layer,
        "threshold": threshold,
        "confidence": config.confidence,
        "min_route_fraction": fraction,
        "routes": [{"epoch": i, **row} for i, row in enumerate(trainer.route_history, start=1)],
        "best_epoch_route": trainer.route_history[best - 1] if best >= 1 else None,
        "final": report.headline(metrics),
    }
    report.save(
        cfg, output_dir, model, data, metrics, strategy={"name": "token_routed", "exit_layer": exit_layer},
        train_state=trainer.training_state(optimizer, stopping, completed=True),
    )  # fmt: skip
    return metrics
