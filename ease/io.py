"""Atomic file writes: a temporary file in the same folder, flushed to disk, then renamed over the target.

A reader (or a run killed mid-write) therefore sees either the old file or the new one, never half of one.
Every file EASE writes that something else reads back (checkpoints, metrics.json, results tables, plots,
evaluation caches) goes through `atomic_write`.
"""

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Let `write(tmp)` fill a temporary path beside `path`, fsync it, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the rename must not reach the disk before the data does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)`, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def jsonable(obj: Any) -> Any:
    """Plain JSON: non-finite floats become null (JSON has no NaN), tensors become numbers, keys strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """JSON (indented, NaN-free) written atomically."""
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
