"""Finding and reading run records (metrics.json): one row per run, and the runs DataFrame with the swept settings."""

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger("ease.results")  # one logger name for the whole package, as before the split

METRICS_FILE = "metrics.json"
# Run columns read from a record's metrics: column -> path inside `metrics`.
METRIC_PATHS: dict[str, tuple[str, ...]] = {
    "ppl": ("ppl",),
    "acc": ("acc",),
    "shallow_ratio": ("shallow_ratio",),
    "compute_cost": ("compute_cost",),
    "loss": ("loss",),
    "routed_loss": ("routed_loss",),
    "test_ppl": ("test", "ppl"),
    "test_acc": ("test", "acc"),
    "epochs_run": ("epochs_run",),
    "best_epoch": ("best_epoch",),
    "train_time_s": ("train_time_s",),
    "eval_time_s": ("eval_time_s",),
    "tokens_per_s": ("tokens_per_s",),
    "num_parameters": ("num_parameters",),
}
# A threshold curve point's metrics (metrics.threshold_analysis[i]).
CURVE_METRICS = ("ppl", "acc", "shallow_ratio", "compute_cost")
# Overrides that do not change a result: runs differing only in these belong to one group.
# Overrides that do not change what a run computes (optuna_trial: the trial number the sweeper hands each job).
NOT_SETTINGS = frozenset({"seed", "threads", "progress", "debug", "save_checkpoint", "optuna_trial"})


def parse_value(text: str | None) -> Any:
    """An override's value as a number or bool where it reads as one, else the text."""
    if text is None:
        return None
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_override(override: str) -> tuple[str, str | None]:
    """`+key=value` / `key=value` / `~key` -> (key, value text or None)."""
    key, _, value = override.lstrip("+~").partition("=")
    return key.strip(), (value.strip() if "=" in override else None)


def read_record(path: Path) -> dict[str, Any]:
    """One metrics.json; raises ValueError saying why it is unusable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(record, dict) or "status" not in record:
        raise ValueError("not an EASE run record (no status)")
    problem = _shape_problem(record)
    if problem:
        raise ValueError(problem)
    return record


def _shape_problem(record: dict[str, Any]) -> str | None:
    """What in the record's structure record_row could not read (hand-edited or foreign JSON), or None."""
    metrics = record.get("metrics") or {}
    objective = record.get("objective") or {}
    checks = [
        (isinstance(record["status"], str), "status is not a string"),
        (isinstance(metrics, dict), "metrics is not a mapping"),
        (isinstance(objective, dict), "objective is not a mapping"),
        (isinstance(objective.get("values") or [], list) if isinstance(objective, dict) else True,
         "objective.values is not a list"),
        (isinstance(record.get("overrides") or [], list), "overrides is not a list"),
        (record.get("seed") is None or (isinstance(record["seed"], int) and not isinstance(record["seed"], bool)),
         "seed is not an integer"),
    ]  # fmt: skip
    if isinstance(metrics, dict):
        weights = metrics.get("layer_weights") or {}
        curve = metrics.get("threshold_analysis") or []
        checks += [
            (isinstance(weights, dict) and all(str(k).isdigit() for k in weights),
             "metrics.layer_weights is not a mapping of layer number -> weight"),
            (isinstance(curve, list) and all(isinstance(p, dict) for p in curve),
             "metrics.threshold_analysis is not a list of mappings"),
        ]  # fmt: skip
    return next((why for ok, why in checks if not ok), None)


def _natural(path: Path) -> list[Any]:
    """Sort key that puts job 2 before job 10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


def find_run_files(dirs: Iterable[str | Path]) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(root, metrics.json) for every record under `dirs`, and run folders (with .hydra/) that have none."""
    found, missing = [], []
    for root in dirs:
        root = Path(root)
        if root.is_file() and root.name == METRICS_FILE:
            found.append((root.parent, root))
            continue
        if not root.is_dir():
            why = "is a file, not a folder of runs" if root.exists() else "no such folder"
            log.warning("%s: %s", root, why)
            continue
        found += [(root, p) for p in sorted(root.rglob(METRICS_FILE), key=_natural)]
        for hydra_dir in sorted(root.rglob(".hydra")):
            if not (hydra_dir.parent / METRICS_FILE).exists():
                missing.append(str(hydra_dir.parent))
    return found, missing


def _get(mapping: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _not_finite(record: dict[str, Any]) -> str | None:
    """Why an ok record counts as status nan, or None.

    Its objective is not finite (Optuna's FAIL), or it has no finite PPL although its task computes one
    (task=generate records none): listed with the failed runs rather than averaged, so every n in the tables
    counts the same runs for every metric.
    """
    values = (record.get("objective") or {}).get("values") or []
    if any(not math.isfinite(_number(v)) for v in values):
        return "objective not finite"
    metrics = record.get("metrics") or {}
    ppl = metrics.get("ppl")
    if record.get("task") == "generate" or math.isfinite(_number(ppl)):
        return None
    if "ppl" not in metrics:
        return "no ppl in metrics"
    return f"ppl is {json.dumps(ppl)}" if ppl is None or isinstance(ppl, float) else "ppl is not a number"


def _status(record: dict[str, Any]) -> str:
    """ok, failed, or nan (finished, but its objective or its PPL is not finite)."""
    if record["status"] != "ok":
        return str(record["status"])
    return "nan" if _not_finite(record) else "ok"


def record_row(record: dict[str, Any], name: str) -> dict[str, Any]:
    """The run's row: metadata, every override as `override:KEY`, metrics, layer weights."""
    metrics = record.get("metrics") or {}
    overrides = [str(o) for o in record.get("overrides") or []]
    settings = {}
    for override in overrides:
        key, value = parse_override(override)
        if key and key not in NOT_SETTINGS:
            settings[key] = value
    row: dict[str, Any] = {
        "run": name,
        "status": _status(record),
        "error": record.get("error") or (_not_finite(record) if _status(record) == "nan" else None),
        "task": record.get("task"),
        "seed": record.get("seed"),
        "group": " ".join(f"{k}={v}" if v is not None else f"~{k}" for k, v in sorted(settings.items())),
        "overrides": " ".join(overrides),
    }
    row.update({f"override:{k}": v for k, v in settings.items()})
    row.update({col: _number(_get(metrics, path)) for col, path in METRIC_PATHS.items()})
    feasible = metrics.get("feasible")  # a sweep with hydra.sweeper.constraints: did this run satisfy them?
    row["feasible"] = float(feasible) if isinstance(feasible, bool) else math.nan
    for layer, weight in (metrics.get("layer_weights") or {}).items():
        row[f"weight_L{layer}"] = _number(weight)
    curve = metrics.get("threshold_analysis")
    # Numbers only in the curve's metrics: a hand-edited "ppl": "n/a" becomes NaN instead of failing the table.
    row["_curve"] = [{**p, **{m: _number(p[m]) for m in CURVE_METRICS if m in p}} for p in curve] if curve else None
    row["_checkpoint"] = metrics.get("checkpoint")
    grid = metrics.get("compute_grid")  # methods at equal compute (ease.comparison): its levels, if recorded
    levels = grid.get("levels") if isinstance(grid, dict) else None
    row["_grid"] = [p for p in levels if isinstance(p, dict)] if isinstance(levels, list) and levels else None
    return row


def collect(dirs: Iterable[str | Path]) -> tuple[pd.DataFrame, list[str], list[tuple[str, str]], list[str]]:
    """Read every record under `dirs`.

    Returns:
        (runs, swept parameter names, skipped (file, why), run folders without metrics.json).
    """
    dirs = [Path(d) for d in dirs]
    files, missing = find_run_files(dirs)
    rows, skipped = [], []
    for root, path in files:
        try:
            record = read_record(path)
        except ValueError as err:
            log.warning("skipping %s: %s", path, err)
            skipped.append((str(path), str(err)))
            continue
        name = os.path.relpath(path.parent, root)
        name = root.name if name == "." else name
        rows.append(record_row(record, name if len(dirs) == 1 else f"{root.name}/{name}"))
        if record["status"] == "ok" and rows[-1]["status"] == "nan":
            log.warning("%s: %s: listed with the failed runs (status nan)", path, rows[-1]["error"])
    for folder in missing:
        log.warning("no %s in %s (killed, or still running)", METRICS_FILE, folder)
    runs = pd.DataFrame(rows)
    if runs.empty:
        return runs, [], skipped, missing
    setting_cols = [c for c in runs.columns if c.startswith("override:")]
    # A setting is swept when its value differs between runs (absent counts as a value).
    swept = [c for c in setting_cols if runs[c].nunique(dropna=False) > 1]
    params = [c.removeprefix("override:") for c in swept]
    renames = {f"override:{p}": p for p in params if p not in runs.columns}
    runs = runs.drop(columns=[c for c in setting_cols if c not in renames]).rename(columns=renames)
    params = [p for p in params if f"override:{p}" in renames]
    for p in params:
        runs[p] = runs[p].map(lambda v: parse_value(v) if isinstance(v, str) else v).astype(object)
    return runs, params, skipped, missing
