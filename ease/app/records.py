"""The run record: metrics.json, written atomically into the job's output folder."""

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import ease

METRICS_FILE = "metrics.json"


def _jsonable(obj: Any) -> Any:
    """Plain JSON: non-finite floats become null (JSON has no NaN), tensors become numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_jsonable(obj), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_record(
    status: str,
    task: str,
    metrics: dict[str, Any],
    config: dict[str, Any],
    overrides: list[str],
    objective: dict[str, Any] | None = None,
    error: str | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    return {
        "status": status,
        "error": error,
        "task": task,
        "metrics": metrics,
        "objective": objective,
        "config": config,
        "overrides": overrides,
        "seed": config.get("seed"),
        "started": started,
        "finished": time.time(),
        "versions": {"ease": ease.__version__, "torch": torch.__version__},
    }
