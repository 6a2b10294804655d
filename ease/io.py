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

TMP_SUFFIX = ".tmp"


def _file_mode() -> int:
    """What a plain `open(..., "w")` would create under the process umask (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Let `write(tmp)` fill a temporary path beside `path`, fsync it, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _file_mode())  # collaborators read results as they read any file the user writes
        write(tmp)
        with open(tmp, "rb+") as f:  # the rename must not reach the disk before the data does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # disk full, quota, permissions: say which file
        raise OSError(err.errno, f"{err.strerror or err}: cannot write {path}") from None
    except RuntimeError as err:
        if "PytorchStreamWriter" not in str(err):  # only torch.save's own report of a failed write
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        raise OSError(f"cannot write {path}: {first}") from None
    finally:
        tmp.unlink(missing_ok=True)


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete the temporary files `atomic_write` leaves in `folder` when the process is killed mid-write."""
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


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
