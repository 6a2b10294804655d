"""What every strategy run adds around its final model: test metrics, the standard keys, the checkpoint."""

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
