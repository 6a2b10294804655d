"""Sweep constraints: `hydra.sweeper.constraints=["compute_cost <= 0.7"]` minimises the objective among the trials
that satisfy them (Optuna's `constraints_func`, taken by the TPE, NSGA-II and GP samplers).

Each constraint is `METRIC <= BOUND` or `METRIC >= BOUND` over a headline metric of the run's record (`ppl`, `loss`,
`acc`, `shallow_ratio`, `compute_cost`). Optuna calls `constraints_func` on the finished trial: its value is
`metric - bound` (`<=`) or `bound - metric` (`>=`), feasible when <= 0, read from the trial's user attributes,
which the job sets (`ease.app.pruning`). The job also records in its metrics.json which constraints held
(`metrics.constraints`, `metrics.feasible`), so the results tables can mark infeasible runs.
"""

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

METRICS = ("ppl", "loss", "acc", "shallow_ratio", "compute_cost")
_PATTERN = re.compile(r"^\s*([a-z_]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str  # "<=" or ">="
    bound: float

    def value(self, metrics: Mapping[str, Any]) -> float:
        """Optuna's convention: <= 0 when satisfied; NaN when the metric is missing."""
        x = metrics.get(self.metric)
        if not isinstance(x, (int, float)) or not math.isfinite(x):
            return math.nan
        return float(x) - self.bound if self.op == "<=" else self.bound - float(x)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


def parse_constraints(value: Any) -> list[Constraint]:
    """`hydra.sweeper.constraints` (a list of `METRIC <= BOUND` strings, or null) -> constraints; one line naming the
    key for anything else."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"hydra.sweeper.constraints: must be a list like ['compute_cost <= 0.7'], got {value!r}")
    out = []
    for text in value:
        m = _PATTERN.match(str(text))
        if m is None or m.group(1) not in METRICS:
            raise ValueError(
                f"hydra.sweeper.constraints: {text!r} is not METRIC <= BOUND or METRIC >= BOUND with METRIC one of "
                f"{', '.join(METRICS)}"
            )
        try:
            bound = float(m.group(3))
        except ValueError:
            raise ValueError(f"hydra.sweeper.constraints: {text!r}: the bound is not a number") from None
        out.append(Constraint(m.group(1), m.group(2), bound))
    return out


class TrialConstraints:
    """Optuna's `constraints_func`: the constraints' values from the trial's user attributes (the job's metrics).
    A trial without the metric (a job that failed before it finished) counts as infeasible."""

    def __init__(self, constraints: Sequence[Constraint]) -> None:
        self.constraints = list(constraints)

    def __call__(self, trial: optuna.trial.FrozenTrial) -> list[float]:
        values = [c.value(trial.user_attrs) for c in self.constraints]
        return [v if math.isfinite(v) else math.inf for v in values]


def record_constraints(metrics: Mapping[str, Any], constraints: Sequence[Constraint]) -> dict[str, Any]:
    """What a run's record keeps: each constraint's value and whether it held, and whether all did."""
    each = {str(c): {"value": c.value(metrics)} for c in constraints}
    for item in each.values():
        item["satisfied"] = math.isfinite(item["value"]) and item["value"] <= 0
    return {"constraints": each, "feasible": all(item["satisfied"] for item in each.values())}
