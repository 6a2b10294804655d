"""Per-epoch checkpoints and `resume=true` for the strategies: the contract of strategy=standard.

With save_checkpoint (default) a strategy run rewrites checkpoint.pt atomically at every epoch end: the model
being trained, the tokenizer, the resolved config and a `train_state` tagged with the strategy's name. Right
after each write the test-only kill hook (`ease.app.runner._kill_hook`, EASE_TEST_KILL_AFTER_EPOCH=N) gets the
number of epochs done so far; for ASHEM that count runs across both phases (phase 1's epochs, then phase
2's), as the run's `history` numbers them. `resume=true` in the same run folder loads the checkpoint and the
strategy carries on from it.
"""

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ease.app.runner import _kill_hook
from ease.checkpoint import save_checkpoint
from ease.model import EarlyExitTransformer

log = logging.getLogger("ease")

ARCHITECTURE_KEYS = ("vocab_size", "dim", "num_layers", "num_heads", "hidden_dim")


def load_for_resume(cfg: DictConfig, path: Path, strategy: str) -> dict[str, Any] | None:
    """With resume=true and a checkpoint in the run folder, the checkpoint dict; None means start afresh.

    Raises a one-line ValueError if the file cannot be read or holds no training state of `strategy`.
    """
    if not cfg.resume:
        return None
    if not path.is_file():
        log.warning("resume=true but %s does not exist: starting from scratch", path)
        return None
    try:
        ckpt = torch.load(path, map_location=cfg.device, weights_only=False)
    except Exception as err:  # truncated or foreign files raise many different errors
        raise ValueError(f"resume: cannot read {path}: {type(err).__name__}: {err}") from None
    state = ckpt.get("train_state") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"resume: {path} holds no training state (saved by another task?)")
    if state.get("strategy") != strategy:
        found = state.get("strategy", "standard")
        raise ValueError(f"resume: {path} was saved by a strategy={found} run, this run is strategy={strategy}")
    return ckpt


def check_architecture(ckpt: dict[str, Any], path: Path, expected: dict[str, Any]) -> None:
    """One-line ValueError when the checkpoint's model differs from the configured one in a key of `expected`."""
    theirs = ckpt.get("model_args", {})
    for key, value in expected.items():
        if theirs.get(key) != value:
            raise ValueError(f"checkpoint: {path} has {key}={theirs.get(key)}, the configured model has {value}")


def architecture(model: EarlyExitTransformer, **overrides: Any) -> dict[str, Any]:
    """The architecture keys of `model`'s constructor arguments, with `overrides` (e.g. another depth)."""
    args = model.config_dict()
    return {**{key: args[key] for key in ARCHITECTURE_KEYS}, **overrides}


class EpochCheckpoints:
    """Writes checkpoint.pt at an epoch end, then calls the test-only kill hook with the epoch count.

    Args:
        cfg: The run's config (save_checkpoint, and the resolved config stored in the file).
        path: The checkpoint file.
        tokenizer: The tokenizer's dict.
    """

    def __init__(self, cfg: DictConfig, path: Path, tokenizer: dict[str, Any]) -> None:
        self.enabled = bool(cfg.save_checkpoint)
        self.path = path
        self.tokenizer = tokenizer
        self.config = OmegaConf.to_container(cfg, resolve=True)

    def __call__(self, model: EarlyExitTransformer, train_state: dict[str, Any], epoch: int) -> None:
        if self.enabled:
            save_checkpoint(self.path, model, self.tokenizer, config=self.config, train_state=train_state)
        _kill_hook(epoch)
