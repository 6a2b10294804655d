"""task=eval: score a saved checkpoint under other routing settings, without training.

`python train.py task=eval checkpoint=RUN_DIR routing=confidence routing.threshold=0.8` loads the model and its
tokenizer, rebuilds the data the checkpoint was trained on, and writes the metrics a training run writes
(ppl, acc, shallow_ratio, compute_cost, per_exit, the threshold curve, test) with `trained: false`.

The per-token pass is cached beside the checkpoint (eval_cache/), keyed by everything that determines it
(the checkpoint file, data, split, exit layers, confidence measure): every routing setting is then scored from
that one pass, so a threshold sweep of K jobs runs the model once, not K times.

Data that does not fit the checkpoint's tokenizer is refused with one line (naming `task.checkpoint_data` when it
is false): text a synthetic tokenizer cannot read, synthetic data for a text tokenizer or with more ids than the
tokenizer's, and (task.checkpoint_data=false) data whose evaluated tokens are more than half `<unk>` (a warning
when the data is the checkpoint's own).
"""

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ease.app import build
from ease.app.calibrate import calibrate_routing
from ease.checkpoint import load_checkpoint, resolve_checkpoint_path
from ease.config import TrainingConfig
from ease.data import DataConfig, TokenBatches, build_data
from ease.data.tokenizers import UNK, Tokenizer, TokenizerMismatchError, tokenizer_from_dict
from ease.evaluation import Batch, TokenStats
from ease.exit_classifier import check_confidence
from ease.io import atomic_save
from ease.routing import normalize_routing
from ease.training import Trainer

log = logging.getLogger("ease")

CACHE_DIR = "eval_cache"
SPLITS = ("val", "test")


class CachedStatsTrainer(Trainer):
    """A Trainer whose one evaluation pass (TokenStats) is read from, or saved to, a cache folder.

    Args:
        config: Loss weights (for the reported `loss`) and routing.
        vocab_size: The model's vocabulary size.
        device: Where the model runs.
        cache_dir: Folder for the cached passes; None turns caching off.
        fingerprint: What identifies the model and the data; the split and the routing exits are added per pass.
    """

    def __init__(
        self,
        config: TrainingConfig,
        vocab_size: int,
        device: str,
        cache_dir: Path | None,
        fingerprint: dict[str, Any],
    ) -> None:
        super().__init__(config, vocab_size, device)
        self.cache_dir = cache_dir
        self.fingerprint = fingerprint
        self.split = "val"  # set before each evaluate(): part of the cache key
        self.passes_run = 0
        self.passes_cached = 0

    def cache_file(self, exit_layers: Sequence[int], num_layers: int) -> Path | None:
        if self.cache_dir is None:
            return None
        weighted = sorted(layer for layer, w in self.config.weights_for(num_layers).items() if w > 0)
        key = {
            **self.fingerprint,
            "split": self.split,
            "exits": sorted(int(e) for e in exit_layers),
            "report_layers": weighted,
            "confidence": self.config.confidence,
            "fields": "argmax",  # passes cached before TokenStats kept argmaxes lack them: not reused
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return self.cache_dir / f"{self.split}-{digest}.pt"

    def token_stats(
        self, model: torch.nn.Module, batches: Iterable[Batch], exit_layers: Sequence[int] | None = None
    ) -> TokenStats:
        exits = self.config.exit_layers if exit_layers is None else exit_layers
        path = self.cache_file(exits, model.num_layers)
        if path is not None and path.is_file():
            try:
                stats = TokenStats(**torch.load(path, map_location="cpu", weights_only=True))
                self.passes_cached += 1
                return stats
            except Exception as err:  # a damaged cache file is only a lost shortcut
                log.warning("eval cache %s unreadable (%s); running the pass again", path, err)
        stats = super().token_stats(model, batches, exits)
        self.passes_run += 1
        if path is not None:
            try:
                atomic_save(vars(stats), path)
            except OSError as err:  # e.g. a read-only checkpoint folder
                log.warning("eval cache not written to %s: %s", path, err)
        return stats


def _trained_config(cfg: DictConfig, ckpt: dict[str, Any]) -> DictConfig:
    """The config the checkpoint was trained with, or this run's if the checkpoint has none."""
    trained = ckpt.get("config")
    return OmegaConf.create(trained) if isinstance(trained, dict) and "data" in trained else cfg


def check_data_fits_tokenizer(data_cfg: DataConfig, tokenizer: Tokenizer, key: str) -> None:
    """One-line ValueError (naming `key`) when synthetic data meets a text tokenizer or too few synthetic ids."""
    kind = getattr(tokenizer, "kind", type(tokenizer).__name__)
    if data_cfg.name != "synthetic":
        return
    if kind != "synthetic":
        raise ValueError(f"{key}: synthetic data needs a synthetic tokenizer, but the checkpoint's tokenizer is {kind}")
    if data_cfg.synthetic_vocab_size > tokenizer.vocab_size:
        raise ValueError(
            f"{key}: data.synthetic_vocab_size={data_cfg.synthetic_vocab_size} is more than the checkpoint's "
            f"synthetic tokenizer's {tokenizer.vocab_size} ids"
        )


def check_unk_share(batches: TokenBatches, tokenizer: Tokenizer, key: str, split: str, refuse: bool) -> None:
    """When more than half of the evaluated targets are the unknown id: a one-line ValueError naming `key`
    (refuse=True: this run's own data), else a warning (the data as trained: a small vocabulary may do this)."""
    unk_id = getattr(tokenizer, "unk_id", None)
    targets = batches.target_sample()
    if unk_id is None or targets.numel() == 0:
        return
    share = (targets == unk_id).double().mean().item()
    if share <= 0.5:
        return
    kind = getattr(tokenizer, "kind", type(tokenizer).__name__)
    message = f"{share:.0%} of the {split} tokens are {UNK} (unknown to the checkpoint's {kind} tokenizer)"
    if refuse:
        raise ValueError(f"{key}: {message}: the data does not match the checkpoint's tokenizer")
    log.warning("%s: %s; the scores mostly measure predicting %s", key, message, UNK)


def eval_training_config(cfg: DictConfig, trained: DictConfig, num_layers: int) -> TrainingConfig:
    """The checkpoint's loss weights (for the reported loss) with this run's routing group."""
    merged = OmegaConf.merge(trained, {"routing": OmegaConf.to_container(cfg.routing, resolve=True)})
    return build.training_config(merged, num_layers)


def eval_task(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Load `cfg.checkpoint`, evaluate it under `cfg.routing`, return the metrics (no training)."""
    if cfg.task.split not in SPLITS:
        raise ValueError(f"task.split: must be one of {', '.join(SPLITS)}, got {cfg.task.split!r}")
    path = resolve_checkpoint_path(cfg.checkpoint, "eval")
    model, ckpt = load_checkpoint(path, map_location=cfg.device)
    if not ckpt.get("tokenizer"):
        raise ValueError(f"checkpoint: {path} holds no tokenizer, so its data cannot be rebuilt")
    routing = build.group(cfg, "routing")
    check_confidence(model, routing.confidence, normalize_routing(routing.exit_layer, 0.0)[0])
    trained = _trained_config(cfg, ckpt)
    source = trained if cfg.task.checkpoint_data else cfg
    data_cfg = build.data_config(source)
    data_seed = int(source.seed)
    tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    key = "data" if cfg.task.checkpoint_data else "task.checkpoint_data"  # false: this run's data, checked here
    check_data_fits_tokenizer(data_cfg, tokenizer, key)
    try:
        data = build_data(data_cfg, seed=data_seed, tokenizer=tokenizer)
    except TokenizerMismatchError as err:
        raise ValueError(
            f"{key}: data {data_cfg.name!r} does not fit the checkpoint's {err.kind} tokenizer ({err.expected}), "
            f"got {err.got!r}"
        ) from None
    if data.vocab_size > model.vocab_size:  # a pretrained embedding may have more rows than its tokenizer ids
        raise ValueError(f"checkpoint: model vocab {model.vocab_size} does not fit its tokenizer's {data.vocab_size}")
    config = eval_training_config(cfg, trained, model.num_layers)
    stat = path.stat()
    fingerprint = {
        "checkpoint": str(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "data": OmegaConf.to_container(source.data, resolve=True),
        "data_seed": data_seed,
        "device": str(cfg.device),
    }
    cache_dir = path.parent / CACHE_DIR if cfg.task.cache_stats else None
    trainer = CachedStatsTrainer(config, model.vocab_size, cfg.device, cache_dir, fingerprint)
    model.to(cfg.device)
    batches = data.val if cfg.task.split == "val" else data.test
    if batches is None:
        raise ValueError(f"task.split: no test split for data {data_cfg.name!r}; use task.split=val")
    check_unk_share(batches, tokenizer, key, cfg.task.split, refuse=not cfg.task.checkpoint_data)

    t0 = time.perf_counter()
    calibration = None
    if routing.calibrate.metric is not None:  # τ from the validation split, then every metric below is τ's
        trainer.split = "val"
        calibration = calibrate_routing(trainer, model, data, routing.calibrate)
    trainer.split = cfg.task.split
    metrics = trainer.evaluate(model, batches, thresholds=list(cfg.routing.analysis_thresholds))
    if calibration is not None:
        metrics["calibration"] = calibration
    metrics["eval_time_s"] = time.perf_counter() - t0
    if cfg.task.split == "val" and data.test is not None:
        trainer.split = "test"
        test = trainer.evaluate(model, data.test)
        metrics["test"] = {k: test[k] for k in ("ppl", "acc", "shallow_ratio", "compute_cost", "loss")}
    metrics.update(
        trained=False,  # the record says no training ran: the weights are the checkpoint's
        epochs_run=0,
        train_time_s=0.0,
        checkpoint=str(path),
        checkpoint_seed=trained.get("seed"),
        checkpoint_metrics=ckpt.get("metrics"),
        split=cfg.task.split,
        model_passes=trainer.passes_run,
        cached_passes=trainer.passes_cached,
        num_parameters=model.num_parameters(),
        layer_weights=config.weights_for(model.num_layers),
        data_source=data.source,
        vocab_size=data.vocab_size,
    )
    log.info(
        "evaluated %s on %s: %d model pass(es), %d from cache", path, cfg.task.split, trainer.passes_run,
        trainer.passes_cached,
    )  # fmt: skip
    return metrics
