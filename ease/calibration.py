"""Threshold calibration: pick the confidence threshold τ from held-out per-token statistics.

A routing threshold means little across models and methods: 0.9 sends 80% of tokens out at one exit of one model
and 5% at another. Calibration turns a target the reader cares about into τ, from one evaluation pass
(`ease.evaluation.TokenStats`) on held-out data:

    exit_share    the share of tokens that leave at a routing exit (shallow_ratio)
    compute_cost  layers computed / total layers, averaged over tokens

Both are monotone in τ (a higher τ lets fewer tokens exit), so τ is found by bisection over the candidate values,
the confidences seen in the data: the achieved value is the closest the data allows. One τ is shared by every
exit of a cascade. A target outside what the data can reach is an error that says what is reachable.

A quality bound (`calibrate_quality`, CALM's Learn then Test) instead picks the smallest τ whose risk (the
routed prediction's disagreement with the full model, or its loss gap) is <= ε with probability >= 1 - δ.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ease.evaluation import TokenStats
from ease.routing import CalibrateConfig, route_from_confidences

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


# --- a quality bound: CALM's Learn-then-Test calibration ------------------------------------------------------
#
# Learn then Test (Angelopoulos et al. 2021), as CALM uses it (Schuster et al. 2022, section 4): for each τ on a
# grid fixed before seeing data, test H0(τ): risk(τ) > ε with a valid p-value from the calibration tokens; go from
# the most conservative τ (1.0: fewest exits) downwards and stop at the first τ whose p-value exceeds δ
# (fixed-sequence testing controls the family-wise error at δ without a multiplicity correction). The smallest τ
# rejected so far is returned: with probability >= 1 - δ over the calibration data its risk is <= ε. The tokens
# are treated as independent draws, which tokens of one text are not quite.


@dataclass
class QualityCalibration:
    """A τ that bounds a quality risk with Learn then Test, and what it gives on the calibration data."""

    quality: str  # disagreement | loss_gap
    epsilon: float
    delta: float
    threshold: float  # τ, shared by every exit layer
    risk: float  # the empirical risk at τ on the calibration data (loss_gap: in nats, clipped)
    p_value: float  # of H0: risk(τ) > ε at the chosen τ
    tested: int  # grid points tested (the last one failed unless the grid ran out)
    loss_clip: float | None
    exit_share: float  # at τ on the calibration data
    compute_cost: float

    def to_dict(self) -> dict[str, object]:
        return dict(vars(self))


def token_risks(
    stats: TokenStats, exit_layers: Sequence[int], threshold: float, quality: str, loss_clip: float = 5.0
) -> torch.Tensor:
    """Each token's loss in [0, 1] when every exit routes at `threshold`, (N,) float64.

    disagreement: 1 where the routed argmax differs from the last layer's (a token that runs to the end: 0).
    loss_gap: (routed NLL - last layer's NLL) clipped to [0, loss_clip], divided by loss_clip.
    """
    L = stats.num_layers
    thresholds = {e: threshold for e in exit_layers}
    exit_at = route_from_confidences({e: stats.confidence[e] for e in exit_layers}, thresholds, L)
    risk = torch.zeros(stats.num_tokens, dtype=torch.float64)
    for e in exit_layers:
        chosen = exit_at == e
        if quality == "disagreement":
            risk[chosen] = (stats.argmax[e][chosen] != stats.argmax[L][chosen]).double()
        else:
            gap = (stats.nll[e][chosen].double() - stats.nll[L][chosen].double()).clamp(0.0, loss_clip)
            risk[chosen] = gap / loss_clip
    return risk


def binomial_p_value(losses: int, n: int, epsilon: float) -> float:
    """P(Binom(n, ε) <= losses): the exact p-value of H0: risk > ε for a 0/1 loss (LTT's binomial tail)."""
    from scipy.stats import binom

    return float(binom.cdf(losses, n, epsilon))


def hoeffding_bentkus_p_value(mean: float, n: int, epsilon: float) -> float:
    """LTT's Hoeffding-Bentkus p-value of H0: risk > ε for a loss in [0, 1] with empirical mean `mean`.

    min(exp(-n h(min(mean, ε), ε)), e P(Binom(n, ε) <= ceil(n mean))), h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)).
    """
    from scipy.stats import binom

    a = min(mean, epsilon)

    def kl(a: float, b: float) -> float:
        first = a * math.log(a / b) if a > 0 else 0.0
        second = (1 - a) * math.log((1 - a) / (1 - b)) if a < 1 else 0.0
        return first + second

    hoeffding = math.exp(-n * kl(a, epsilon))
    bentkus = math.e * float(binom.cdf(math.ceil(n * mean), n, epsilon))
    return min(hoeffding, bentkus, 1.0)


def ltt_grid(size: int) -> list[float]:
    """The fixed τ grid, most conservative first: 1, 1 - 1/size, ..., 1/size."""
    return [(size - k) / size for k in range(size)]


def calibrate_quality(
    stats: TokenStats,
    exit_layers: Sequence[int],
    quality: str,
    epsilon: float,
    delta: float,
    loss_clip: float = 5.0,
    grid_size: int = 100,
    key: str = "routing.calibrate",
) -> QualityCalibration:
    """The smallest τ on the grid (the most exits) whose risk is <= ε with probability >= 1 - δ (Learn then Test).

    disagreement is a 0/1 loss: binomial p-values. loss_gap is bounded by clipping (`token_risks`): Hoeffding-
    Bentkus p-values on gap / loss_clip against ε / loss_clip. Raises a one-line ValueError naming `key` when even
    the most conservative τ cannot be certified.
    """
    missing = [e for e in exit_layers if e not in stats.confidence or e not in stats.argmax]
    if missing or stats.num_layers not in stats.argmax:
        raise ValueError(f"{key}: the calibration pass has no confidences or argmaxes at exit layers {missing}")
    n = stats.num_tokens
    scale = 1.0 if quality == "disagreement" else loss_clip
    level = epsilon / scale

    def test(tau: float) -> tuple[float, float]:
        risks = token_risks(stats, exit_layers, tau, quality, loss_clip)
        if quality == "disagreement":
            losses = int(risks.sum().item())
            return losses / n, binomial_p_value(losses, n, level)
        mean = risks.mean().item()
        return mean, hoeffding_bentkus_p_value(mean, n, level)

    chosen: tuple[float, float, float] | None = None
    tested = 0
    for tau in ltt_grid(grid_size):
        risk, p = test(tau)
        tested += 1
        if p > delta:
            if chosen is None:
                raise ValueError(
                    f"{key}.epsilon: no threshold satisfies ε={epsilon} at δ={delta}; the most conservative τ "
                    f"({tau}) has risk {risk * scale:.4f} (p-value {p:.3g}) on {n} tokens"
                )
            break
        chosen = (tau, risk, p)
    tau, risk, p = chosen
    routed = stats.routed(tuple(exit_layers), (tau,) * len(exit_layers))
    return QualityCalibration(
        quality, float(epsilon), float(delta), tau, risk * scale, p, tested,
        loss_clip if quality == "loss_gap" else None, routed["shallow_ratio"], routed["compute_cost"],
    )  # fmt: skip


def calibrate(
    stats: TokenStats, exit_layers: Sequence[int], config: CalibrateConfig
) -> Calibration | QualityCalibration:
    """`routing.calibrate` on one pass: a target exit share / compute cost, or a quality bound (LTT)."""
    if config.metric == "quality":
        return calibrate_quality(
            stats, exit_layers, config.quality, config.epsilon, config.delta, config.loss_clip, config.grid_size
        )
    return calibrate_threshold(stats, exit_layers, config.metric, config.target)


def measured(
    stats: TokenStats, exit_layers: Sequence[int], threshold: float, config: CalibrateConfig
) -> dict[str, float]:
    """What calibration targeted, measured at `threshold` on other data (the test split): the metric, or the risk
    with the exit share and compute cost beside it."""
    routed = stats.routed(tuple(exit_layers), (threshold,) * len(exit_layers))
    out = {"exit_share": routed["shallow_ratio"], "compute_cost": routed["compute_cost"], "tokens": stats.num_tokens}
    if config.metric == "quality":
        scale = 1.0 if config.quality == "disagreement" else config.loss_clip
        risks = token_risks(stats, exit_layers, threshold, config.quality, config.loss_clip)
        out["risk"] = risks.mean().item() * scale
    return out
