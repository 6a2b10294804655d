"""task=train: the Hydra edge of the three strategies (standard, token_routed, ashem).

Each builds the library's objects from the config, trains through the library's one loop, and leaves the
same record: routed validation metrics with the threshold curve from one pass, test metrics, the training
summary, the weights actually trained (and the α schedule reached, if there is one), and checkpoint.pt.

Per-epoch checkpoints and `resume=true`: with save_checkpoint (default) checkpoint.pt is rewritten atomically
at every epoch end with the model being trained, the tokenizer, the resolved config and a `train_state`
tagged with the strategy's name; `resume=true` in the same run folder carries on from it and ends with the
metrics of an uninterrupted run. After each write the run's `callbacks` (instantiated from the `callbacks`
config key) get `on_epoch_end(epoch, row)`; for ASHEM the epoch count runs across both phases, as the run's
history numbers them.

Keys ASHEM reads: strategy.* (ASHEMConfig's fields), model.* (model.num_layers must equal
strategy.phase2_layers), train.max_epochs (each phase), train.batch_size, train.weight_decay,
train.grad_clip, train.monitor (phase 1), routing.confidence, routing.analysis_thresholds, seed, device.
train.lr and train.patience are not used (phase1_lr/phase2_lr, phase1_patience/phase2_patience are).
Token-routed reads routing.* (one exit, one threshold: the two routes), strategy.min_route_fraction,
model.*, lr_scales.*, train.*; loss_weights stays final_only and schedule constant.
"""

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ease import distributed, exit_classifier
from ease.app import build
from ease.app.calibrate import calibrate_routing
from ease.app.loggers import build_loggers, check_loggers
from ease.app.pruning import TrialPruned, active_reporter
from ease.checkpoint import architecture, check_architecture, load_for_resume, save_checkpoint
from ease.comparison import GRID_KEY, evaluate_grid
from ease.config import TrainingConfig
from ease.data import DataBundle, build_data
from ease.distillation import Distiller
from ease.distributed import DistContext, check_setup, full_state_dict, wrap
from ease.hf.backbone import HFBackbone
from ease.hf.loading import save_pretrained
from ease.losses import check_min_route_fraction
from ease.model.backbone import Backbone
from ease.model.layer_dropout import LayerDropout, dropout_rates
from ease.model.mod import MixtureOfDepths, mod_metrics
from ease.routing import CalibrateConfig, needs_hidden
from ease.stop import StopRequested
from ease.strategies.ashem import ASHEMConfig, ASHEMProgress, check_resume_mode, run_ashem
from ease.strategies.token_routed import TokenRoutedTrainer, token_routed_config
from ease.training import EarlyStoppingState, Trainer
from ease.training.lr_schedule import LrSchedule
from ease.training.precision import check_precision
from ease.training.trainer import LossModule

log = logging.getLogger("ease")

HEADLINE = ("ppl", "acc", "shallow_ratio", "compute_cost")
CHECKPOINT_FILE = "checkpoint.pt"
HF_DIR = "hf"  # beside checkpoint.pt: an HF backbone in save_pretrained format


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: metrics[key] for key in HEADLINE}


# --- what every run writes -----------------------------------------------------------------------------------


class RunOutput:
    """checkpoint.pt at every epoch end and at the end, then the run's callbacks.

    Args:
        cfg: The run's config (save_checkpoint, callbacks, and the resolved config stored in the file).
        output_dir: The run folder.
        data: The data (its tokenizer is stored with the model).
    """

    def __init__(self, cfg: DictConfig, output_dir: Path, data: DataBundle, dist: DistContext | None = None) -> None:
        self.dist = dist or distributed.current()
        self.root: Any = None  # the FSDP2 root module of a sharded run (set once wrapped)
        self.enabled = bool(cfg.save_checkpoint)
        self.path = output_dir / CHECKPOINT_FILE
        self.tokenizer = data.tokenizer.to_dict()
        self.hf_tokenizer = data.tokenizer if hasattr(data.tokenizer, "save_pretrained") else None
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.callbacks = build.run_callbacks(cfg)

    def save(self, model: Backbone, train_state: dict[str, Any], **extra: Any) -> None:
        """Rank 0 writes (every rank calls: sharded weights are gathered first, through `self.root`)."""
        if not self.enabled:
            return
        weights = full_state_dict(model, self.dist, self.root)
        if self.dist.is_main:
            save_checkpoint(
                self.path, model, self.tokenizer, weights, config=self.config, train_state=train_state, **extra
            )

    def finish(self, model: Backbone, train_state: dict[str, Any], **extra: Any) -> None:
        """The final checkpoint; a Hugging Face backbone also goes to hf/ in save_pretrained format."""
        self.save(model, train_state, **extra)
        if self.enabled and self.dist.is_main and isinstance(model, HFBackbone):
            hf_dir = save_pretrained(model, self.path.parent / HF_DIR, self.hf_tokenizer)
            log.info("saved %s (AutoModelForCausalLM.from_pretrained or ease.hf.from_pretrained loads it)", hf_dir)

    def epoch_end(self, model: Backbone, train_state: dict[str, Any], epoch: int, row: dict) -> None:
        self.save(model, train_state)
        if self.dist.is_main:
            for callback in self.callbacks:
                callback.on_epoch_end(epoch, row)


def resume_checkpoint(cfg: DictConfig, output_dir: Path, strategy: str) -> dict[str, Any] | None:
    """With resume=true, the run folder's checkpoint to carry on from (None: start afresh)."""
    if not cfg.resume:
        return None
    return load_for_resume(output_dir / CHECKPOINT_FILE, strategy, cfg.device)


def evaluate_test_split(trainer: Trainer, model: Backbone, data: DataBundle) -> dict[str, float] | None:
    """Routed metrics on the test split, when the data has one."""
    if data.test is None:
        return None
    test = trainer.evaluate(model, data.test)
    return {key: test[key] for key in (*HEADLINE, "loss")}


def trained_weights(trainer: Trainer, result: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """What was trained, not what was configured: the layer weights of the epoch whose weights were kept, and
    with an α schedule its plan and the α actually reached (the schedule spans train.max_epochs; early
    stopping may end it sooner)."""
    history = result["history"]
    best = result["best_epoch"]
    kept = history[best - 1]["weights"] if best >= 1 else trainer.config.weights_for(num_layers)
    kept = {int(k): float(v) for k, v in kept.items()}
    out: dict[str, Any] = {"layer_weights": {layer: kept.get(layer, 0.0) for layer in range(1, num_layers + 1)}}
    schedule = trainer.config.alpha_schedule
    if schedule is not None:
        shallow = trainer.config.shallow_layer
        alphas = [row["weights"][shallow] for row in history]
        out["alpha_schedule"] = {
            "kind": schedule.kind,
            "start": schedule.start,
            "end": schedule.end,
            "planned_epochs": trainer.total_epochs,
            "epochs_run": len(history),
            "reached": alphas[-1] if alphas else None,
            "best_epoch_alpha": kept[shallow],
            "monitor": result["monitor"],
        }
    return out


def final_metrics(
    trainer: Trainer,
    model: Backbone,
    data: DataBundle,
    result: dict[str, Any],
    thresholds: list[float],
    calibrate: CalibrateConfig | None = None,
) -> dict[str, Any]:
    """The standard keys of a training run: routed val metrics with the threshold curve from one pass, test
    metrics, and the training summary from `train_with_early_stopping`'s `result`. With `calibrate` (routing.
    calibrate.metric set) the threshold is first calibrated on the validation split and every metric is τ's."""

    t0 = time.perf_counter()
    calibration = calibrate_routing(trainer, model, data, calibrate) if calibrate and calibrate.metric else None
    metrics = trainer.evaluate(model, data.val, thresholds=thresholds)
    metrics["eval_time_s"] = time.perf_counter() - t0
    test = evaluate_test_split(trainer, model, data)
    if test is not None:
        metrics["test"] = test
    if calibration is not None:
        metrics["calibration"] = calibration
    metrics.update(
        history=result["history"],
        best_epoch=result["best_epoch"],
        epochs_run=result["epochs_run"],
        train_time_s=result["train_time_s"],
        tokens_per_s=result["tokens_per_s"],
        num_parameters=model.num_parameters(),
        **trained_weights(trainer, result, model.num_layers),
        data_source=data.source,
        vocab_size=data.vocab_size,
    )
    return metrics


def compare_exits(cfg: DictConfig) -> list[int]:
    """The exit(s) the compute grid routes at: compare.exit_layer, else the run's routing.exit_layer; checked
    against the model's depth before any data is read."""
    compare = build.group(cfg, "compare")
    exits = compare.exit_layer if compare.exit_layer is not None else build.routing_settings(cfg)[0]
    exits = [exits] if isinstance(exits, int) else [int(e) for e in exits]
    L = build.model_depth(cfg)
    if any(not 1 <= e < L for e in exits):
        key = "compare.exit_layer" if compare.exit_layer is not None else "routing.exit_layer"
        raise ValueError(f"{key}: the compute grid routes at a layer in 1..{L - 1} for a {L}-layer model, got {exits}")
    return exits


def add_compute_grid(cfg: DictConfig, metrics: dict[str, Any], model: Backbone, data: DataBundle, device: str) -> None:
    """With compare.compute_grid set: the trained model at every compute level (calibrated on val, scored on
    test, decoding timed) into metrics[GRID_KEY]; nothing at the default (an empty grid)."""
    compare = build.group(cfg, "compare")
    if not compare.enabled:
        return
    if data.test is None or distributed.current().enabled:
        why = "the data has no test split" if data.test is None else "not run under torchrun (sharded model)"
        log.warning("compare.compute_grid: skipped: %s", why)
        metrics[GRID_KEY] = {"skipped": why, "levels": []}
        return
    fixed_metrics = metrics.get("test")
    if isinstance(model, MixtureOfDepths):  # its cost is set by capacity, not a threshold: scored causally
        mod = mod_metrics(model, data.test)
        fixed_metrics = {"ppl": mod["ppl_predictor"], "loss": math.log(mod["ppl_predictor"]),
                         "compute_cost": mod["compute_cost_predictor"], "mod_inference": "predictor"}  # fmt: skip
        compare = dataclasses.replace(compare, fixed_cost=True)
    grid = evaluate_grid(
        model, data.val, data.test, compare, compare_exits(cfg), cfg.routing.confidence, device,
        fixed_test_metrics=fixed_metrics,
    )  # fmt: skip
    metrics[GRID_KEY] = grid
    reached = [row for row in grid["levels"] if row["reachable"]]
    log.info(
        "compute grid (test): %s",
        ", ".join(
            f"{row['target']:.2f}->{row['test']['compute_cost']:.2f} ppl {row['test']['ppl']:.2f}" for row in reached
        ),
    )


# --- strategy=standard and strategy=token_routed: one Trainer each -------------------------------------------


def check_fixed_weights(cfg: DictConfig, strategy: str, why: str) -> None:
    """Strategies that choose each token's loss themselves: loss_weights stays final_only, schedule constant."""
    if cfg.loss_weights.kind != "final_only":
        raise ValueError(f"loss_weights.kind: {why}; leave it final_only, got {cfg.loss_weights.kind!r}")
    if cfg.schedule.kind != "constant":
        raise ValueError(f"schedule.kind: {strategy} has no α to schedule; use constant, got {cfg.schedule.kind!r}")


def token_routed_training_config(cfg: DictConfig) -> TrainingConfig:
    """The TokenRoutedTrainer's config; errors name the Hydra key."""
    if cfg.routing.kind != "confidence":
        raise ValueError(
            f"routing.kind: token_routed routes tokens by confidence; use routing=confidence, got {cfg.routing.kind!r}"
        )
    check_fixed_weights(
        cfg, "token_routed", "token_routed scores each token at its own route, so there are no weights to set"
    )
    base = build.training_config(cfg)  # routing, LR scales and their ranges, with Hydra key names
    if len(base.exit_layers) != 1:
        raise ValueError(f"routing.exit_layer: token_routed takes one exit layer, got {list(base.exit_layers)}")
    return token_routed_config(
        build.model_depth(cfg),
        base.exit_layers[0],
        base.routing_thresholds[0],
        base.layer_lr_scales,
        base.confidence,
        embedding_lr_scale=base.embedding_lr_scale,
        head_lr_scale=base.head_lr_scale,
    )


def min_route_fraction(cfg: DictConfig) -> float:
    return check_min_route_fraction(build.group(cfg, "strategy").min_route_fraction)


def lr_schedule(cfg: DictConfig) -> LrSchedule:
    """train.lr_schedule / warmup_steps / min_lr; its length is set when training starts (steps or epochs)."""
    return LrSchedule(cfg.train.lr_schedule, cfg.train.warmup_steps, cfg.train.min_lr / cfg.train.lr)


def make_trainer(cfg: DictConfig, vocab_size: int, distill: Distiller | None = None) -> Trainer:
    """The Trainer of strategy=standard (with `distill`, distillation to the exits) or strategy=token_routed."""
    steps = {
        "grad_accum": cfg.train.grad_accum,
        "precision": cfg.train.precision,
        "lr_schedule": lr_schedule(cfg),
        "dist": distributed.current(),
    }
    if cfg.strategy.name == "token_routed":
        config = token_routed_training_config(cfg)
        return TokenRoutedTrainer(
            config, vocab_size, cfg.device, cfg.train.grad_clip, min_route_fraction(cfg), progress=cfg.progress, **steps
        )
    config = build.training_config(cfg)
    L = build.model_depth(cfg)
    return Trainer(
        config, vocab_size, cfg.device, cfg.train.grad_clip, progress=cfg.progress, distill=distill, **steps,
        curriculum=build.group(cfg, "loss_weights").curriculum_for(L), layer_dropout=layer_dropout(cfg, L),
    )  # fmt: skip


def layer_dropout(cfg: DictConfig, num_layers: int) -> LayerDropout | None:
    """LayerSkip's per-example layer dropout of the `layer_dropout` group (None when max_rate is 0)."""
    settings = build.group(cfg, "layer_dropout")
    if not settings.enabled:
        return None
    return LayerDropout(dropout_rates(num_layers, settings.max_rate, settings.scale), cfg.seed)


def layerskip_record(trainer: Trainer, num_layers: int) -> dict[str, Any]:
    """What the curriculum and the layer dropout did (the keys exist only when they are on)."""
    out: dict[str, Any] = {}
    if trainer.curriculum is not None:
        out["curriculum"] = trainer.curriculum.record(trainer.step, trainer.planned_steps, num_layers)
    if trainer.layer_dropout is not None:
        out["layer_dropout"] = trainer.layer_dropout.record()
    return out


def run_device(cfg: DictConfig) -> str:
    """The device this process trains on: under torchrun on CUDA, the rank's own GPU."""
    ctx = distributed.current()
    if ctx.enabled and str(cfg.device).startswith("cuda"):
        return f"cuda:{ctx.local_rank}"
    return str(cfg.device)


def find_unused(trainer: Trainer, model: Backbone) -> bool:
    """DDP must be told when some parameters get no gradient: layers above the deepest weighted exit."""
    if trainer.layer_dropout is not None:  # a layer may skip every row of a rank's batch
        return True
    weights = trainer.config.weights_for(model.num_layers)
    return max(layer for layer, w in weights.items() if w > 0) < model.num_layers


def train_with_trainer(cfg: DictConfig, data: DataBundle, output_dir: Path) -> dict[str, Any]:
    """strategy=standard or token_routed: weighted (or routed) training with early stopping, the final routed
    evaluation with the threshold curve, checkpoint.pt every epoch; returns the metrics."""
    strategy = cfg.strategy.name
    ctx = distributed.configure(cfg.train.distributed)
    device = run_device(cfg)
    model = build.model(cfg, data.vocab_size).to(device)
    classifier = build.group(cfg, "routing").classifier
    if classifier.train != "none":  # CALM's exit heads, one per routing exit, saved in checkpoint.pt
        exit_classifier.attach(model, model.exit_layers, classifier.kind)
    # a pretrained embedding may have more rows than the data's ids
    trainer = make_trainer(cfg, model.vocab_size, build.distiller(cfg, model.vocab_size, device))
    trainer.device = torch.device(device)
    classifier_lr = exit_classifier.learning_rate(classifier.lr, cfg.train.lr)
    if classifier.train == "joint":
        trainer.classifier_weight = classifier.weight
    if cfg.compile:  # torch.compile wins in training, not in decoding (docs/speed.md)
        for block in model.layers:
            block.compile()
    out = RunOutput(cfg, output_dir, data, ctx)
    stopping = EarlyStoppingState()
    ckpt = resume_checkpoint(cfg, output_dir, strategy)
    if ckpt is not None:
        check_architecture(ckpt, out.path, architecture(model))
        model.load_state_dict(ckpt["model"])  # before sharding: every rank loads the full weights
    if ctx.enabled:
        trainer.loss_module = wrap(
            LossModule(trainer, model), ctx, trainer.device, list(model.layers), find_unused(trainer, model)
        )
        out.root = trainer.loss_module
    optimizer = trainer.create_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    if classifier.train == "joint":  # the heads are no backbone param group: their own, at routing.classifier.lr
        scale = classifier_lr / cfg.train.lr
        heads = list(model.exit_classifier.parameters())
        optimizer.add_param_group({"params": heads, "lr": classifier_lr, "lr_scale": scale, "name": "exit_classifier"})
    if ckpt is not None:
        stopping = trainer.restore_training_state(ckpt["train_state"], optimizer)
        log.info("resumed from %s after evaluation %d (step %d)", out.path, len(stopping.history), trainer.step)
    log.info("model: %d layers, dim %d, %d parameters", model.num_layers, model.dim, model.num_parameters())
    train_batches = data.train.shard(ctx.rank, ctx.world_size) if ctx.enabled else data.train
    loggers = build_loggers(cfg, output_dir, ctx.rank)
    loggers.log_config(out.config)
    if loggers:
        trainer.on_step = lambda record: loggers.log_metrics(
            {k: v for k, v in record.items() if k != "step"}, record["step"]
        )

    def train_state(stopping: EarlyStoppingState, completed: bool) -> dict[str, Any]:
        return {**trainer.training_state(optimizer, stopping, completed), "strategy": strategy}

    reporter = active_reporter()

    def on_epoch_end(epoch: int, stopping: EarlyStoppingState) -> None:
        row = stopping.history[-1]
        out.epoch_end(model, train_state(stopping, completed=False), epoch, row)
        loggers.log_metrics(eval_record(row), trainer.step)
        if reporter is not None:  # an Optuna sweep's job: report this evaluation; may stop here (TrialPruned)
            reporter.report(len(stopping.history), row, list(stopping.history))

    status = "failed"
    try:
        result = trainer.train_with_early_stopping(
            model, train_batches, data.val, optimizer, cfg.train.max_epochs, cfg.train.patience, True,
            cfg.train.monitor, state=stopping, on_epoch_end=on_epoch_end, max_steps=cfg.train.max_steps,
            eval_every=cfg.train.eval_every, eval_batches=cfg.train.eval_batches,
        )  # fmt: skip
        heads = None
        if classifier.train == "after":  # a short stage, the backbone frozen
            heads = exit_classifier.train_after(model, data.train, classifier.epochs, classifier_lr, trainer.device)
        elif classifier.train == "joint":
            heads = {"train": "joint", "weight": classifier.weight, "lr": classifier_lr}
        calibrate = build.group(cfg, "routing").calibrate
        metrics = final_metrics(trainer, model, data, result, list(cfg.routing.analysis_thresholds), calibrate)
        metrics["training"] = training_summary(cfg, trainer, result, ctx)
        metrics.update(layerskip_record(trainer, model.num_layers))
        if heads is not None:
            quality = exit_classifier.classifier_quality(model, data.val, trainer.device)
            metrics["exit_classifier"] = {**heads, "kind": classifier.kind, "layers": list(model.exit_layers),
                                          "val": quality}  # fmt: skip
        add_compute_grid(cfg, metrics, model, data, device)
        if isinstance(model, MixtureOfDepths):  # both routings' ppl and the compute actually run
            metrics["mod"] = mod_metrics(model, data.val)
        extra: dict[str, Any] = {}
        if strategy == "token_routed":
            metrics["strategy"], extra["strategy"] = token_routed_summary(trainer, result, metrics)
        if trainer.distill is not None:
            metrics["distill"] = distill_summary(cfg, trainer, model, data, result, ctx)
        out.finish(model, train_state(stopping, completed=True), metrics=headline(metrics), **extra)
        loggers.log_metrics({f"final/{key}": metrics[key] for key in HEADLINE}, trainer.step)
        status = "ok"
    except TrialPruned:
        status = "pruned"
        raise
    except StopRequested:
        status = "interrupted"
        if trainer.interrupted_state() is not None:  # stopped between two training steps: save that point
            out.save(model, train_state(stopping, completed=False))
            log.info("checkpoint at step %d written to %s", trainer.step, out.path)
        raise
    finally:
        loggers.close(status)
    return metrics


def eval_record(row: dict[str, Any]) -> dict[str, Any]:
    """A history row's evaluation as logger metrics (val/ppl, val/loss, ...)."""
    keys = ("val_loss", "val_ppl", "val_acc", "shallow_ratio", "compute_cost", "train_loss")
    record = {key.replace("val_", "val/") if key.startswith("val_") else f"val/{key}": row[key] for key in keys}
    record["train/epoch_loss"] = record.pop("val/train_loss")
    record["epoch"] = row.get("data_epoch", row["epoch"])
    return record


def training_summary(cfg: DictConfig, trainer: Trainer, result: dict[str, Any], ctx: DistContext) -> dict[str, Any]:
    """How the run was trained: steps taken, the effective batch, precision, processes, the LR schedule."""
    summary = {
        "by": "steps" if cfg.train.max_steps is not None else "epochs",
        "steps_run": trainer.step,
        "grad_accum": trainer.grad_accum,
        "global_batch": cfg.train.batch_size * trainer.grad_accum,
        "precision": trainer.precision.name,
        "world_size": ctx.world_size,
        "distributed": ctx.kind if ctx.enabled else None,
        "lr_schedule": {
            "kind": cfg.train.lr_schedule,
            "warmup_steps": cfg.train.warmup_steps,
            "min_lr": cfg.train.min_lr,
            "total_steps": trainer.lr_schedule.total_steps if trainer.lr_schedule is not None else None,
        },
    }
    if "best_step" in result:
        summary.update(best_step=result["best_step"], max_steps=cfg.train.max_steps)
    return summary


def check_distill(cfg: DictConfig) -> None:
    """Distillation runs on the weighted exit loss (strategy=standard); self-distillation needs the last
    layer weighted, as its logits are the teacher."""
    d = build.group(cfg, "distill")
    if not d.enabled:
        return
    if cfg.strategy.name != "standard":
        raise ValueError(
            f"distill.weight: distillation trains the weighted exit loss of strategy=standard, got "
            f"strategy={cfg.strategy.name} (set distill=none)"
        )
    L = build.model_depth(cfg)
    if d.teacher is None and build.training_config(cfg, L).weights_for(L).get(L, 0.0) <= 0:
        raise ValueError(
            f"distill.weight: self-distillation teaches from the last layer ({L}), which has no loss weight "
            f"(loss_weights: give layer {L} a weight > 0)"
        )


def distill_summary(
    cfg: DictConfig, trainer: Trainer, model: Backbone, data: DataBundle, result: dict[str, Any], ctx: DistContext
) -> dict[str, Any]:
    """What distillation did: the teacher, the student exits, each epoch's training KL per exit, and the KL
    per exit left on the validation data at the end (single process only)."""
    d, L = trainer.distill, model.num_layers
    history, best = result["history"], result["best_epoch"]
    weights = history[best - 1]["weights"] if best >= 1 else trainer.config.weights_for(L)
    weights = {int(k): float(v) for k, v in weights.items()}
    epochs = [{"epoch": row["epoch"], **row["distill"]} for row in history if "distill" in row]
    summary: dict[str, Any] = {
        "kind": d.kind,
        "weight": d.weight,
        "temperature": d.temperature,
        "teacher": cfg.distill.teacher,
        "teacher_layer": L if d.teacher is None else d.teacher.num_layers,
        "students": sorted(layer for layer, w in weights.items() if w > 0 and (d.teacher is not None or layer < L)),
        "epochs": epochs,
        "best_epoch_kl": history[best - 1].get("distill", {}).get("kl") if best >= 1 else None,
    }
    if not ctx.enabled:
        summary["val_kl"] = d.evaluate(model, data.val, weights, trainer.device)
    return summary


def token_routed_summary(trainer: Trainer, result: dict[str, Any], metrics: dict[str, Any]) -> tuple[dict, dict]:
    routes = [row["route"] for row in result["history"]]
    best = result["best_epoch"]
    config = trainer.config
    summary = {
        "name": "token_routed",
        "exit_layer": config.exit_layers[0],
        "threshold": config.routing_thresholds[0],
        "confidence": config.confidence,
        "min_route_fraction": trainer.min_route_fraction,
        "routes": [{"epoch": i, **row} for i, row in enumerate(routes, start=1)],
        "best_epoch_route": routes[best - 1] if best >= 1 else None,
        "final": headline(metrics),
    }
    return summary, {"name": "token_routed", "exit_layer": config.exit_layers[0]}


# --- strategy=ashem --------------------------------------------------------------------------------------------


def ashem_config(cfg: DictConfig) -> ASHEMConfig:
    """ASHEMConfig from strategy.* (and routing.confidence, train.max_epochs); errors name the Hydra key."""
    return build.group(cfg, "strategy").ashem(cfg.routing.confidence, cfg.train.max_epochs)


def validate_ashem(cfg: DictConfig) -> None:
    """Bad ASHEM settings fail here, before any data is read."""
    config = ashem_config(cfg)
    L = build.model_depth(cfg)
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
    check_fixed_weights(cfg, "ASHEM", "ASHEM trains each block on its last layer")
    if cfg.lr_scales.kind != "uniform":
        raise ValueError(
            f"lr_scales.kind: ASHEM sets each phase's rate with strategy.phase1_lr/phase2_lr; use uniform, "
            f"got {cfg.lr_scales.kind!r}"
        )


def train_ashem(cfg: DictConfig, data: DataBundle, output_dir: Path) -> dict[str, Any]:
    """Both phases, the routed evaluation (val, and test when there is one), checkpoint.pt; returns metrics."""
    config = ashem_config(cfg)
    k, L = config.phase1_layers, config.phase2_layers
    if config.skip_phase1:  # a pretrained model's layers 1..k are Block 1: no phase 1, no growth
        phase1_model = build.model(cfg, data.vocab_size, routing=(k, 0.0)).to(cfg.device)
        log.info("ASHEM: layers 1-%d frozen as they are (phase 1 skipped), phase 2 trains %d-%d", k, k + 1, L)
    else:
        phase1_model = build.model(cfg, data.vocab_size, num_layers=k, routing=(k, 0.0)).to(cfg.device)
        log.info("ASHEM: phase 1 trains layers 1-%d, phase 2 layers %d-%d; routing at layer %d", k, k + 1, L, k)
    out = RunOutput(cfg, output_dir, data)
    ckpt = resume_checkpoint(cfg, output_dir, "ashem")
    if ckpt is not None:
        state = ckpt["train_state"]
        check_resume_mode(config, state)
        depth = L if config.skip_phase1 or state["phase"] == 2 else k
        check_architecture(ckpt, out.path, architecture(phase1_model, num_layers=depth))
        log.info("resumed from %s after epoch %d (ASHEM phase %d)", out.path, state["epoch"], state["phase"])

    def on_epoch_end(p: ASHEMProgress) -> None:
        history = p.state["phase1_train"] if p.phase == 1 else p.state["phase2_train"]
        out.epoch_end(p.model, p.state, p.epoch, history["early_stopping"]["history"][-1])

    def on_stop(p: ASHEMProgress) -> None:  # a stop signal between two steps: save that point
        out.save(p.model, p.state)
        log.info("checkpoint at phase %d, epoch %d + a part written to %s", p.phase, p.phase_epoch + 1, out.path)

    r = run_ashem(
        config, phase1_model, data.train, data.val, cfg.device, cfg.train.batch_size, cfg.train.weight_decay,
        cfg.train.grad_clip, cfg.train.monitor, list(cfg.routing.analysis_thresholds), cfg.seed, cfg.progress,
        resume=ckpt, on_epoch_end=on_epoch_end, on_stop=on_stop,
    )  # fmt: skip

    metrics = dict(r.final)
    test = evaluate_test_split(r.eval_trainer, r.model, data)
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
    if data.test is not None and not config.skip_phase1:  # skipped: Block 1 is the final model's layers 1..k
        phase1["test"] = evaluate_test_split(Trainer(config.phase1_config(), device=cfg.device), r.phase1_model, data)
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
        # val: phase 2 trained and early-stopped on the validation tokens, so val metrics are in-sample
        "in_sample": config.hard_examples_from == "val",
        "num_hard_tokens": r.hard_examples.num_hard_tokens,
        "num_source_tokens": r.hard_examples.num_tokens,
        "val_hard_ratio": r.val_examples.hard_ratio,
        "phase2": phase2,
        "frozen_params_unchanged": r.frozen_params_unchanged,
        "final": headline(metrics),
    }
    if test is not None:
        metrics["strategy"]["final"]["test"] = headline(test)
    add_compute_grid(cfg, metrics, r.model, data, cfg.device)
    out.finish(
        r.model,
        r.state,
        metrics=headline(metrics),
        strategy={"name": "ashem", "exit_layer": k, "threshold": r.threshold},
    )
    return metrics


# --- the task ----------------------------------------------------------------------------------------------------

STRATEGY_RUNS: dict[str, Callable[[DictConfig, DataBundle, Path], dict[str, Any]]] = {
    "standard": train_with_trainer,
    "token_routed": train_with_trainer,
    "ashem": train_ashem,
}


def validate(cfg: DictConfig) -> None:
    """Every check of the training settings that can run before data is read."""
    name = cfg.strategy.name
    check_precision(cfg.train.precision, cfg.device)
    check_setup(cfg.train.distributed, cfg.train.batch_size, distributed.env_world_size(), name)
    if name == "ashem" and (cfg.train.max_steps is not None or cfg.train.grad_accum != 1):
        key = "max_steps" if cfg.train.max_steps is not None else "grad_accum"
        raise ValueError(f"train.{key}: ashem trains each phase by epochs with one batch per step; leave it unset")
    if build.group(cfg, "layer_dropout").enabled and name != "standard":
        raise ValueError(f"layer_dropout.max_rate: layer dropout trains with strategy=standard only, got {name!r}")
    check_calm(cfg, name)
    if name == "standard":
        build.training_config(cfg)
    elif name == "token_routed":
        token_routed_training_config(cfg)
        min_route_fraction(cfg)
    elif name == "ashem":
        validate_ashem(cfg)
    if build.group(cfg, "compare").enabled:
        compare_exits(cfg)
    build.mod_config(cfg)
    check_distill(cfg)
    build.run_callbacks(cfg)
    check_loggers(cfg)  # a bad logger.* value or a missing library fails here, before data is read


def check_calm(cfg: DictConfig, strategy: str) -> None:
    """CALM's pieces (hidden-state confidences, exit classifiers, calibration) run with strategy=standard only."""
    routing = build.group(cfg, "routing")
    if strategy != "standard":
        if routing.classifier.train != "none":
            raise ValueError(f"routing.classifier.train: exit classifiers train with strategy=standard, got {strategy}")
        if routing.calibrate.metric is not None:
            raise ValueError(f"routing.calibrate.metric: calibration runs with strategy=standard, got {strategy}")
        if needs_hidden(routing.confidence):
            raise ValueError(
                f"routing.confidence: {routing.confidence} runs with strategy=standard (or task=eval), got {strategy}"
            )
    if routing.classifier.train != "none" and distributed.env_world_size() > 1:
        raise ValueError("routing.classifier.train: exit classifiers train in a single process, not under torchrun")
    if routing.confidence == "classifier" and routing.classifier.train == "none":
        raise ValueError(
            "routing.confidence: classifier needs exit classifiers; set routing.classifier.train=joint|after"
        )


def train_task(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """task=train: load data, then train with the configured strategy."""
    ctx = distributed.current()
    if ctx.enabled and not ctx.is_main:  # rank 0 tokenizes (data=files) and fills the cache; the others read it
        ctx.barrier()
    data = build_data(build.data_config(cfg), seed=cfg.seed)
    if ctx.enabled and ctx.is_main:
        ctx.barrier()
    return STRATEGY_RUNS[cfg.strategy.name](cfg, data, output_dir)
