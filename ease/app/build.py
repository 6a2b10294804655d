"""The edge between Hydra and the library: turn a composed config into library objects.

Everything here validates through the library's own dataclasses, so a bad value fails with one line that
names its key, before any data is read or any training starts.
"""

from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ease.config import TrainingConfig
from ease.data import DataConfig
from ease.losses import asymmetric, final_only, uniform
from ease.model.transformer import EarlyExitTransformer
from ease.schedule import AlphaSchedule
from ease.strategies import STRATEGIES

LOSS_WEIGHT_KINDS = ("final_only", "uniform", "asymmetric", "shallow_deep", "with_middle", "custom")
LR_SCALE_KINDS = ("uniform", "decreasing", "increasing", "custom")
ROUTING_KINDS = ("none", "confidence")
OBJECTIVES = ("ppl", "acc", "compute_cost", "shallow_ratio", "loss")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: must be one of {', '.join(allowed)}, got {value!r}")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def layer_weights(cfg: DictConfig, num_layers: int, shallow: int) -> dict[int, float]:
    """{layer: weight} for the `loss_weights` group."""
    lw = cfg.loss_weights
    _choice("loss_weights.kind", lw.kind, LOSS_WEIGHT_KINDS)
    if lw.kind in ("asymmetric", "shallow_deep", "with_middle") and not 0.0 <= lw.alpha <= 1.0:
        raise ValueError(f"loss_weights.alpha: must be in [0, 1], got {lw.alpha}")
    shallow = lw.shallow_layer or shallow
    if lw.kind in ("asymmetric", "shallow_deep", "with_middle") and not 1 <= shallow < num_layers:
        raise ValueError(f"loss_weights.shallow_layer: must be in 1..{num_layers - 1}, got {shallow}")
    if lw.kind == "final_only":
        return final_only(num_layers)
    if lw.kind == "uniform":
        return uniform(num_layers)
    if lw.kind in ("asymmetric", "shallow_deep"):
        return asymmetric(num_layers, lw.alpha, shallow)
    if lw.kind == "with_middle":
        return asymmetric(num_layers, lw.alpha, shallow, middle=lw.middle)
    if len(lw.weights) != num_layers:
        raise ValueError(
            f"loss_weights.weights: custom needs one weight per layer ({num_layers}), got {list(lw.weights)}"
        )
    return {i: float(v) for i, v in enumerate(lw.weights, start=1)}


def lr_scales(cfg: DictConfig, num_layers: int) -> dict[int, float] | None:
    """{layer: scale} for the `lr_scales` group; the 3-value seed lists are resampled to other depths."""
    ls = cfg.lr_scales
    _choice("lr_scales.kind", ls.kind, LR_SCALE_KINDS)
    if ls.kind == "uniform":
        return None
    values = [float(v) for v in ls.scales]
    if ls.kind == "custom" and len(values) != num_layers:
        raise ValueError(f"lr_scales.scales: custom needs one scale per layer ({num_layers}), got {values}")
    if not values:
        raise ValueError("lr_scales.scales: needs at least one value")
    # Piecewise-linear resampling over relative depth: exact for a 3-layer model and 3 values.
    src = np.linspace(0.0, 1.0, len(values))
    dst = np.linspace(0.0, 1.0, num_layers)
    return {i + 1: float(v) for i, v in enumerate(np.interp(dst, src, values))}


def routing_settings(cfg: DictConfig) -> tuple[Any, Any]:
    """(exit_layer, threshold) as the library takes them; `routing=none` gives threshold 0."""
    r = cfg.routing
    _choice("routing.kind", r.kind, ROUTING_KINDS)
    exit_layer = _plain(r.exit_layer)
    threshold = _plain(r.threshold) if r.kind == "confidence" else 0.0
    if r.kind == "confidence" and not isinstance(threshold, list) and threshold == 0:
        raise ValueError("routing.threshold: must be in (0, 1] with routing=confidence (use routing=none for no exit)")
    return exit_layer, threshold


def alpha_schedule(cfg: DictConfig) -> AlphaSchedule | None:
    s = cfg.schedule
    kinds = ("constant", "linear", "cosine")
    _choice("schedule.kind", s.kind, kinds)
    if s.kind == "constant":
        return None
    if cfg.loss_weights.kind not in ("asymmetric", "shallow_deep", "with_middle"):
        raise ValueError(
            f"schedule.kind: {s.kind!r} moves α, so loss_weights must be asymmetric, shallow_deep or with_middle, "
            f"got {cfg.loss_weights.kind!r}"
        )
    start = cfg.loss_weights.alpha if s.start is None else s.start
    try:
        return AlphaSchedule(s.kind, start, s.end)
    except ValueError as err:
        raise ValueError(f"schedule.{str(err).removeprefix('alpha_schedule.')}") from None


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


def _hydra_key_error(err: ValueError) -> ValueError:
    message = str(err)
    for field_name, key in _KEY_NAMES.items():
        if message.startswith(field_name + ":") or message.startswith(field_name + "."):
            return ValueError(key + message[len(field_name) :])
    return err


def training_config(cfg: DictConfig, num_layers: int | None = None) -> TrainingConfig:
    """The library's TrainingConfig for this run (validated, checked against the model's depth)."""
    try:
        return _training_config(cfg, num_layers)
    except ValueError as err:
        raise _hydra_key_error(err) from None


def _training_config(cfg: DictConfig, num_layers: int | None) -> TrainingConfig:
    num_layers = num_layers or cfg.model.num_layers
    exit_layer, threshold = routing_settings(cfg)
    shallow = exit_layer if isinstance(exit_layer, int) else min(exit_layer)
    ls = cfg.lr_scales
    config = TrainingConfig(
        layer_weights=layer_weights(cfg, num_layers, shallow),
        exit_layer=exit_layer,
        routing_threshold=threshold,
        layer_lr_scales=lr_scales(cfg, num_layers),
        alpha_schedule=alpha_schedule(cfg),
        confidence=cfg.routing.confidence,
        embedding_lr_scale=ls.embedding,
        head_lr_scale=ls.head,
    )
    config.check_model(num_layers)
    return config


def data_config(cfg: DictConfig) -> DataConfig:
    fields = _plain(cfg.data)
    fields["fallback_splits"] = tuple(fields["fallback_splits"])
    return DataConfig(**fields, batch_size=cfg.train.batch_size)


def model(
    cfg: DictConfig, vocab_size: int, num_layers: int | None = None, routing: tuple[Any, Any] | None = None
) -> EarlyExitTransformer:
    """The native model of the `model` group, sized to the data; `num_layers` / `routing` override the config."""
    m = cfg.model
    exit_layer, threshold = routing or routing_settings(cfg)
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
    )


def check_run_settings(cfg: DictConfig) -> None:
    """Checks of the top-level and train.* keys that no library dataclass owns."""
    t = cfg.train
    if t.max_epochs < 1:
        raise ValueError(f"train.max_epochs: must be >= 1, got {t.max_epochs}")
    if t.patience < 1:
        raise ValueError(f"train.patience: must be >= 1, got {t.patience}")
    if t.batch_size < 1:
        raise ValueError(f"train.batch_size: must be >= 1, got {t.batch_size}")
    if not t.lr > 0:
        raise ValueError(f"train.lr: must be > 0, got {t.lr}")
    if t.weight_decay < 0:
        raise ValueError(f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    _choice("train.monitor", t.monitor, ("loss", "ppl", "routed_loss"))
    _choice("strategy.name", cfg.strategy.name, STRATEGIES)
    for name in cfg.objective:
        _choice("objective", name, OBJECTIVES)
    if not cfg.objective:
        raise ValueError(f"objective: needs at least one of {', '.join(OBJECTIVES)}")
    m = cfg.model
    if m.num_layers < 1 or m.dim < 1 or m.num_heads < 1:
        raise ValueError("model: num_layers, dim and num_heads must be >= 1")
    if m.dim % m.num_heads or (m.dim // m.num_heads) % 2:
        raise ValueError(f"model.num_heads: must divide model.dim={m.dim} into even head sizes, got {m.num_heads}")
    if not 0.0 <= m.dropout < 1.0:
        raise ValueError(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads: must be >= 1, got {cfg.threads}")
    if not (cfg.device == "cpu" or cfg.device.startswith(("cuda", "mps"))):
        raise ValueError(f"device: must be cpu, cuda[:N] or mps, got {cfg.device!r}")


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
