"""Threshold calibration: pick the confidence threshold τ from held-out per-token statistics.

A routing threshold means little across models and methods: 0.9 sends 80% of tokens out at one exit of one model
and 5% at another. Calibration turns a target the reader cares about into τ, from one evaluation pass
(`ease.evaluation.TokenStats`) on held-out data:

    exit_share    the share of tokens that leave at a routing exit (shallow_ratio)
    compute_cost  layers computed / total layers, averaged over tokens

Both are monotone in τ (a higher τ lets fewer tokens exit), so τ is found by bisection over the candidate values,
the confidences seen in the data: the achieved value is the closest the data allows. One τ is shared by every
exit of a cascade. A target outside what the data can reach is an error that says what is reachable.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ease.evaluation import TokenStats

CALIBRATION_METRICS = ("exit_share", "compute_cost")


@dataclass
class Calibration:
    """A calibrated threshold and what it gives on the data it was calibrated on."""

    metric: str  # exit_share | compute_cost
    target: float
    threshold: float  # τ, shared by every exit layer
    achieved: float  # the metric at τ on the calibration data
    reachable: tuple[float, float]  # the metric's range over every τ in (0, 1]

    def to_dict(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "target": self.target,
            "threshold": self.threshold,
            "achieved": self.achieved,
            "reachable": list(self.reachable),
        }


def metric_at(stats: TokenStats, exit_layers: Sequence[int], threshold: float, metric: str) -> float:
    """exit_share or compute_cost when every exit in `exit_layers` routes at `threshold`."""
    routed = stats.routed(tuple(exit_layers), (threshold,) * len(exit_layers))
    return routed["shallow_ratio"] if metric == "exit_share" else routed["compute_cost"]


def candidate_thresholds(stats: TokenStats, exit_layers: Sequence[int]) -> torch.Tensor:
    """Every τ that changes a routing decision on this data, ascending, within (0, 1]."""
    values = torch.cat([stats.confidence[e].double().reshape(-1) for e in exit_layers]).clamp(max=1.0)
    values = torch.unique(values[values > 0])  # sorted ascending
    return values if values.numel() else torch.tensor([1.0], dtype=torch.float64)


def calibrate_threshold(
    stats: TokenStats, exit_layers: Sequence[int], metric: str, target: float, key: str = "routing.calibrate"
) -> Calibration:
    """The τ whose `metric` on `stats` is closest to `target` (ties: the larger τ, the more conservative).

    `stats` must hold confidences at every exit in `exit_layers` (`collect_token_stats` with those exits).
    Raises a one-line ValueError naming `key` when the target is outside what any τ reaches on this data.
    """
    if metric not in CALIBRATION_METRICS:
        raise ValueError(f"{key}.metric: must be one of {', '.join(CALIBRATION_METRICS)}, got {metric!r}")
    missing = [e for e in exit_layers if e not in stats.confidence]
    if missing:
        raise ValueError(f"{key}: no confidences at exit layers {missing} in the calibration pass")
    candidates = candidate_thresholds(stats, exit_layers)
    # exit_share falls and compute_cost rises as τ grows; `value(i)` at candidate i.
    cache: dict[int, float] = {}

    def value(i: int) -> float:
        if i not in cache:
            cache[i] = metric_at(stats, exit_layers, float(candidates[i]), metric)
        return cache[i]

    n = candidates.numel()
    ends = (value(0), value(n - 1))
    low, high = min(ends), max(ends)
    if metric == "exit_share":  # τ just above the largest confidence lets no token exit
        low = 0.0
    slack = 1.0 / max(stats.num_tokens, 1)
    if not low - slack <= target <= high + slack:
        raise ValueError(
            f"{key}.target: {metric} {target} is not reachable on this data; any threshold in (0, 1] gives "
            f"{metric} in [{low:.4f}, {high:.4f}]"
        )
    increasing = metric == "compute_cost"
    lo, hi = 0, n - 1  # bisection for the first candidate on the far side of the target
    while lo < hi:
        mid = (lo + hi) // 2
        beyond = value(mid) >= target if increasing else value(mid) <= target
        if beyond:
            hi = mid
        else:
            lo = mid + 1
    best_i = lo
    if lo > 0 and abs(value(lo - 1) - target) < abs(value(lo) - target):
        best_i = lo - 1
    threshold, achieved = float(candidates[best_i]), value(best_i)
    if metric == "exit_share" and target < achieved and abs(target) < abs(achieved - target):
        # No exit at all is closer: τ past every confidence. Routing needs τ <= 1, and a confidence of 1.0 exits.
        threshold, achieved = 1.0, metric_at(stats, exit_layers, 1.0, metric)
    return Calibration(metric, float(target), threshold, achieved, (low, high))
