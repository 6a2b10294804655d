"""What every strategy run adds around its final model: test metrics, the standard keys, the checkpoint."""

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ease.checkpoint import save_checkpoint
from ease.model import EarlyExitTransformer
from ease.trainer import Trainer

HEADLINE = ("ppl", "acc", "shallow_ratio", "compute_cost")


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: metrics[key] for key in HEADLINE}


def evaluate_test_split(trainer: Trainer, model: EarlyExitTransformer, data: Any) -> dict[str, float] | None:
    """Routed metrics on the test split, when the data has one."""
    if data.test is None:
        return None
    test = trainer.evaluate(model, data.test)
    return {key: test[key] for key in (*HEADLINE, "loss")}


def final_metrics(
    trainer: Trainer,
    model: EarlyExitTransformer,
    data: Any,
    result: dict[str, Any],
    analysis_thresholds: list[float],
) -> dict[str, Any]:
    """The standard keys of a training run: routed val metrics with the threshold curve from one pass, test
    metrics, and the training summary from `train_with_early_stopping`'s `result`."""
    t0 = time.perf_counter()
    metrics = trainer.evaluate(model, data.val, thresholds=analysis_thresholds)
    metrics["eval_time_s"] = time.perf_counter() - t0
    test = evaluate_test_split(trainer, model, data)
    if test is not None:
        metrics["test"] = test
    metrics.update(
        history=result["history"],
        best_epoch=result["best_epoch"],
        epochs_run=result["epochs_run"],
        train_time_s=result["train_time_s"],
        tokens_per_s=result["tokens_per_s"],
        num_parameters=model.num_parameters(),
        layer_weights=trainer.config.weights_for(model.num_layers),
        data_source=data.source,
        vocab_size=data.vocab_size,
    )
    return metrics


def save(
    cfg: DictConfig, output_dir: Path, model: EarlyExitTransformer, data: Any, metrics: dict, **extra: Any
) -> None:
    """checkpoint.pt: the routed model (its routing is in model_args), tokenizer, resolved config, headline."""
    if not cfg.save_checkpoint:
        return
    save_checkpoint(
        output_dir / "checkpoint.pt",
        model,
        data.tokenizer.to_dict(),
        config=OmegaConf.to_container(cfg, resolve=True),
        metrics=headline(metrics),
        **extra,
    )
