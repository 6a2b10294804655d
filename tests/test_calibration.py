"""Threshold calibration (ease.calibration) against a brute-force search over every threshold."""

import pytest
import torch

from ease.calibration import calibrate_threshold
from ease.evaluation import TokenStats


def fake_stats(n: int, exits: tuple[int, ...], num_layers: int = 4, seed: int = 0) -> TokenStats:
    g = torch.Generator().manual_seed(seed)
    stats = TokenStats(num_layers=num_layers, num_tokens=n)
    for layer in {*exits, num_layers}:
        stats.nll[layer] = torch.rand(n, generator=g) * 5
        stats.correct[layer] = torch.rand(n, generator=g) > 0.5
    for e in exits:
        # Quantised confidences: ties must be handled as routing does (conf >= τ exits).
        stats.confidence[e] = (torch.rand(n, generator=g) ** (1 + e) * 200).round() / 200
    return stats


def brute_force(stats: TokenStats, exits: tuple[int, ...], metric: str, target: float) -> float:
    """The best achievable |metric - target| over every distinct confidence used as τ (plain loop)."""
    best = float("inf")
    values = sorted({float(v) for e in exits for v in stats.confidence[e] if v > 0})
    for tau in values:
        exit_at = torch.full((stats.num_tokens,), stats.num_layers)
        for e in sorted(exits, reverse=True):
            exit_at = torch.where(stats.confidence[e] >= tau, torch.tensor(e), exit_at)
        share = (exit_at < stats.num_layers).double().mean().item()
        cost = exit_at.double().mean().item() / stats.num_layers
        best = min(best, abs((share if metric == "exit_share" else cost) - target))
    return best


@pytest.mark.parametrize("exits", [(1,), (1, 2)])
@pytest.mark.parametrize("metric", ["exit_share", "compute_cost"])
def test_calibration_reaches_the_best_achievable_value(exits, metric):
    stats = fake_stats(3000, exits)
    for target in (0.3, 0.5, 0.62, 0.8):
        if metric == "compute_cost" and target < 0.4:
            continue
        cal = calibrate_threshold(stats, exits, metric, target)
        assert abs(cal.achieved - target) == pytest.approx(brute_force(stats, exits, metric, target), abs=1e-12)
        routed = stats.routed(exits, (cal.threshold,) * len(exits))
        assert cal.achieved == pytest.approx(routed["shallow_ratio" if metric == "exit_share" else "compute_cost"])


def test_calibrated_exit_share_holds_on_held_out_tokens():
    stats = fake_stats(20000, (1,), seed=1)
    half = TokenStats(num_layers=4, num_tokens=10000)
    rest = TokenStats(num_layers=4, num_tokens=10000)
    for name in ("confidence", "nll", "correct"):
        for layer, t in getattr(stats, name).items():
            getattr(half, name)[layer], getattr(rest, name)[layer] = t[:10000], t[10000:]
    for target in (0.25, 0.5, 0.75):
        cal = calibrate_threshold(half, (1,), "exit_share", target)
        held_out = rest.routed((1,), (cal.threshold,))["shallow_ratio"]
        assert abs(held_out - target) <= 0.02


def test_unreachable_target_says_what_is_reachable():
    stats = fake_stats(500, (2,))
    with pytest.raises(ValueError, match=r"^routing\.calibrate\.target: compute_cost 0\.1 is not reachable.*\[0\.5"):
        calibrate_threshold(stats, (2,), "compute_cost", 0.1)
    with pytest.raises(ValueError, match=r"^routing\.calibrate\.metric: must be one of"):
        calibrate_threshold(stats, (2,), "speed", 0.5)
