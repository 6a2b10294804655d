"""The edge between Hydra and the library: turn a composed config into library objects.

Each group becomes its library config object with `OmegaConf.to_object` (`group`), whose `__post_init__`
validates it and names the key of a bad value; the checks that span groups (a layer the model does not have,
ASHEM's depth) run here or in `ease.app.train_task`. All of it runs before any data is read.
"""

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ease.app.schema import TaskConfig, check_top_level
from ease.comparison import CompareConfig
from ease.config import LrScalesConfig, TrainingConfig
from ease.data import DataConfig
from ease.distillation import DistillConfig, Distiller, load_teacher
from ease.losses import LossWeightsConfig
from ease.model.backbone import Backbone
from ease.model.config import ModelConfig
from ease.model.layer_dropout import LayerDropoutConfig
from ease.model.mod import MoDConfig, build_mod
from ease.model.transformer import EarlyExitTransformer
from ease.routing import RoutingConfig
from ease.schedule import ScheduleConfig
from ease.strategies import StrategyConfig
from ease.training.config import TrainConfig

# Validation order: strategy first, as presets derive other groups' values from it (ASHEM's depth and exit).
GROUPS = {
    "strategy": StrategyConfig,
    "model": ModelConfig,
    "mod": MoDConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "loss_weights": LossWeightsConfig,
    "lr_scales": LrScalesConfig,
    "routing": RoutingConfig,
    "schedule": ScheduleConfig,
    "task": TaskConfig,
    "layer_dropout": LayerDropoutConfig,
    "compare": CompareConfig,
    "distill": DistillConfig,
}


def group(cfg: DictConfig, name: str) -> Any:
    """The `name` group as its library config object (validated by its __post_init__)."""
    node = cfg[name]
    if OmegaConf.is_config(node) and OmegaConf.get_type(node) is GROUPS[name]:
        return OmegaConf.to_object(node)
    # A config saved in a checkpoint is plain data: build the class from it (old checkpoints lack new keys).
    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    return GROUPS[name](**plain)


def routing_settings(cfg: DictConfig) -> tuple[Any, Any]:
    """(exit_layer, threshold) as the library takes them; `routing=none` gives threshold 0."""
    return group(cfg, "routing").settings()


# Library field names -> the Hydra keys a user typed, so errors name what to change.
_KEY_NAMES = {
    "routing_threshold": "routing.threshold",
    "exit_layer": "routing.exit_layer",
    "exit_layers": "routing.exit_layer",
    "layer_weights": "loss_weights",
    "layer_lr_scales": "lr_scales",
    "alpha_schedule": "schedule",
    "confidence": "routing.confidence",
    "embedding_lr_scale": "lr_scales.embedding",
    "head_lr_scale": "lr_scales.head",
}


def hydra_key_error(err: ValueError) -> ValueError:
    message = str(err)
    for field_name, key in _KEY_NAMES.items():
        if message.startswith(field_name + ":") or message.startswith(field_name + "."):
            return ValueError(key + message[len(field_name) :])
    return err


def model_depth(cfg: DictConfig) -> int:
    """The model's depth L: model.num_layers, or for a pretrained HF model left at null its own (config.json)."""
    m = group(cfg, "model")
    if m.num_layers is not None:
        return m.num_layers
    from ease.hf import load_config

    return int(load_config(m.name_or_path).num_hidden_layers)


def training_config(cfg: DictConfig, num_layers: int | None = None) -> TrainingConfig:
    """The library's TrainingConfig for this run (validated, checked against the model's depth)."""
    num_layers = num_layers or model_depth(cfg)
    routing = group(cfg, "routing")
    loss_weights = group(cfg, "loss_weights")
    lr_scales = group(cfg, "lr_scales")
    schedule = group(cfg, "schedule")
    if schedule.kind != "constant" and not loss_weights.moves_alpha:
        raise ValueError(
            f"schedule.kind: {schedule.kind!r} moves α, so loss_weights must be asymmetric, shallow_deep or "
            f"with_middle, got {loss_weights.kind!r}"
        )
    exit_layer, threshold = routing.settings()
    shallow = exit_layer if isinstance(exit_layer, int) else min(exit_layer)
    try:
        config = TrainingConfig(
            layer_weights=loss_weights.layer_weights(num_layers, shallow),
            exit_layer=exit_layer,
            routing_threshold=threshold,
            layer_lr_scales=lr_scales.scales_for(num_layers),
            alpha_schedule=schedule.schedule(loss_weights.alpha),
            confidence=routing.confidence,
            embedding_lr_scale=lr_scales.embedding,
            head_lr_scale=lr_scales.head,
        )
        config.check_model(num_layers)
    except ValueError as err:
        raise hydra_key_error(err) from None
    return config


def data_config(cfg: DictConfig) -> DataConfig:
    """The `data` group; `data.tokenizer=hf` with no tokenizer_path takes the model's own (model.name_or_path)."""
    data = group(cfg, "data")
    if data.tokenizer == "hf" and data.tokenizer_path is None:
        m = group(cfg, "model")
        if m.backbone == "hf" and m.name_or_path is not None:
            data = dataclasses.replace(data, tokenizer_path=m.name_or_path)
    return data


def model(
    cfg: DictConfig, vocab_size: int, num_layers: int | None = None, routing: tuple[Any, Any] | None = None
) -> Backbone:
    """`backbone`, wrapped in Mixture-of-Depths when mod.capacity is set (`ease.model.mod`)."""
    inner = backbone(cfg, vocab_size, num_layers, routing)
    return build_mod(inner, mod_config(cfg, inner.num_layers))


def mod_config(cfg: DictConfig, num_layers: int | None = None) -> MoDConfig:
    """The `mod` group, checked against the strategy and the model's depth (Mixture-of-Depths, when enabled)."""
    mod = group(cfg, "mod") if "mod" in cfg else MoDConfig()
    if mod.enabled:
        if cfg.strategy.name != "standard":
            raise ValueError(f"mod.capacity: Mixture-of-Depths trains with strategy=standard, got {cfg.strategy.name}")
        mod.capacities(num_layers or model_depth(cfg))
    return mod


def backbone(
    cfg: DictConfig, vocab_size: int, num_layers: int | None = None, routing: tuple[Any, Any] | None = None
) -> Backbone:
    """The backbone of the `model` group, sized to the data; `num_layers` / `routing` override the config."""
    m = group(cfg, "model")
    exit_layer, threshold = routing or routing_settings(cfg)
    if m.backbone == "hf":
        from ease.hf import from_model_config

        return from_model_config(m, vocab_size, num_layers, exit_layer, threshold, cfg.routing.confidence)
    return EarlyExitTransformer(
        vocab_size=vocab_size,
        dim=m.dim,
        num_layers=num_layers or m.num_layers,
        num_heads=m.num_heads,
        exit_layer=exit_layer,
        routing_threshold=threshold,
        hidden_dim=m.hidden_dim,
        dropout=m.dropout,
        tie_weights=m.tie_weights,
        confidence=cfg.routing.confidence,
        norm=m.norm,
        positions=m.positions,
        ffn=m.ffn,
        max_positions=m.max_positions,
    )


def check_run_settings(cfg: DictConfig) -> None:
    """Every group's own checks, and the top-level keys no group owns."""
    for name in GROUPS:
        group(cfg, name)
    check_top_level(cfg)


def run_callbacks(cfg: DictConfig) -> list[Any]:
    """The `callbacks` group: {name: {_target_: CLASS, ...}}, each instantiated, called with
    `on_epoch_end(epoch, history_row)` after every epoch's checkpoint."""
    from hydra.utils import instantiate

    out = []
    for name, spec in (cfg.get("callbacks") or {}).items():
        if not OmegaConf.is_config(spec) or "_target_" not in spec:
            raise ValueError(f"callbacks.{name}: needs _target_ (a class with on_epoch_end(epoch, row))")
        try:
            callback = instantiate(spec)
        except Exception as err:
            raise ValueError(f"callbacks.{name}: cannot instantiate {spec._target_}: {err}") from None
        if not callable(getattr(callback, "on_epoch_end", None)):
            raise ValueError(f"callbacks.{name}: {spec._target_} has no on_epoch_end(epoch, row)")
        out.append(callback)
    return out


def distiller(cfg: DictConfig, vocab_size: int, device: Any = "cpu") -> Distiller | None:
    """The `distill` group's Distiller (its frozen teacher loaded on `device`), or None when it is off."""
    d = group(cfg, "distill")
    if not d.enabled:
        return None
    return Distiller(d.weight, d.temperature, load_teacher(d.teacher, vocab_size, device) if d.teacher else None)
