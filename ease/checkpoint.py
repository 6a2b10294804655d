"""Saving and loading models with what is needed to use them again (architecture, tokenizer, metadata).

A checkpoint is one dict of plain data and tensors, written atomically (`ease.io.atomic_save`) and read back
with `torch.load(weights_only=True)`, so loading a file can never run code from it.
"""

import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from ease.exit_classifier import attach, classifier_of
from ease.io import atomic_save
from ease.model.backbone import Backbone
from ease.model.transformer import EarlyExitTransformer

log = logging.getLogger("ease")

ARCHITECTURE_KEYS = ("vocab_size", "dim", "num_layers", "num_heads", "hidden_dim")
HF_KEYS = ("backbone", "model_type")  # a Hugging Face backbone's config_dict also has these


def resolve_checkpoint_path(value: str | None, task: str) -> Path:
    """`checkpoint=` as a file: a checkpoint.pt, or a run folder holding one; one-line errors otherwise."""
    if not value:
        raise ValueError(
            f"checkpoint: task={task} needs checkpoint=PATH (a checkpoint.pt or the run folder holding it)"
        )
    path = Path(value).expanduser()
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"checkpoint: file not found: {path}")
    return path.resolve()


def save_checkpoint(
    path: str | Path,
    model: Backbone,
    tokenizer: dict | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    **extra: Any,
) -> None:
    """Model weights (`weights`, default `model.state_dict()`; a sharded model passes its gathered full weights)
    + constructor arguments + the tokenizer's dict + anything else (e.g. the config)."""
    state = model.state_dict() if weights is None else weights
    args = model.config_dict()
    clf = classifier_of(model)
    if clf is not None:  # CALM's exit heads: rebuilt by model_from_args before the weights load
        args["exit_classifier"] = clf.config_dict()
    atomic_save({"model_args": args, "model": state, "tokenizer": tokenizer, **extra}, path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", key: str = "checkpoint") -> dict:
    """The checkpoint dict at `path`; one-line ValueError (naming `key`) if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{key}: file not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # objects beyond plain data: code could run if it were loaded unsafely
        raise ValueError(
            f"{key}: {path} holds Python objects that safe loading (weights_only=True) refuses, so it was not "
            "loaded: a checkpoint written by an EASE version before 2026-12, or not an EASE checkpoint"
        ) from None
    except Exception as err:  # truncated or foreign files raise many different errors
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{key}: cannot read {path}: {type(err).__name__}: {first}") from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{key}: {path} is not an EASE checkpoint (no model_args/model)")
    return ckpt


def model_from_args(args: dict[str, Any]) -> Backbone:
    """The architecture a checkpoint's model_args describe (native, or a Hugging Face one), weights not loaded;
    with its exit classifier (`ease.exit_classifier`) when the args list one."""
    args = dict(args)
    heads = args.pop("exit_classifier", None)
    if args.get("backbone") == "hf":
        from ease.hf import from_config_dict

        model = from_config_dict(args)
    else:
        model = EarlyExitTransformer(**args)
    if heads is not None:
        attach(model, heads["layers"], heads["kind"])
    return model


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Backbone, dict]:
    """Rebuild the model from a checkpoint; returns (model, the whole checkpoint dict)."""
    ckpt = read_checkpoint(path, map_location)
    model = model_from_args(ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model.to(map_location), ckpt


def check_architecture(ckpt: dict[str, Any], path: str | Path, expected: dict[str, Any]) -> None:
    """One-line ValueError when the checkpoint's model differs from the configured one in a key of `expected`."""
    theirs = ckpt.get("model_args", {})
    for key, value in expected.items():
        if theirs.get(key) != value:
            raise ValueError(f"checkpoint: {path} has {key}={theirs.get(key)}, the configured model has {value}")


def architecture(model: Backbone, **overrides: Any) -> dict[str, Any]:
    """The architecture keys of `model`'s constructor arguments, with `overrides` (e.g. another depth)."""
    args = model.config_dict()
    keys = (*ARCHITECTURE_KEYS, *HF_KEYS) if args.get("backbone") == "hf" else ARCHITECTURE_KEYS
    return {key: overrides.get(key, args[key]) for key in keys}


def load_for_resume(path: Path, strategy: str, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The checkpoint in a run folder that `resume=true` carries on from; None means start afresh.

    Raises a one-line ValueError if the file cannot be read or holds no training state of `strategy`.
    """
    if not path.is_file():
        log.warning("resume=true but %s does not exist: starting from scratch", path)
        return None
    ckpt = read_checkpoint(path, map_location, key="resume")
    state = ckpt.get("train_state")
    if not isinstance(state, dict):
        raise ValueError(f"resume: {path} holds no training state (saved by another task?)")
    found = state.get("strategy", "standard")
    if found != strategy:
        raise ValueError(f"resume: {path} was saved by a strategy={found} run, this run is strategy={strategy}")
    return ckpt
