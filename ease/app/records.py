"""The run record: metrics.json, written atomically (`ease.io.write_json_atomic`) into the job's output folder."""

import time
from typing import Any

import torch

import ease

METRICS_FILE = "metrics.json"


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
