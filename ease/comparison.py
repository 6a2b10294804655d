"""Methods at equal compute: score one trained model at a grid of compute costs, on held-out data.

Methods reach different compute costs at the same threshold, so comparing them at their own τ compares
nothing. For each level c of `compute_grid` (layers computed / total layers):

    calibrate   τ on the VALIDATION split so that compute_cost(τ) is closest to c (`ease.calibration`)
    evaluate    the TEST split at that τ: ppl, acc, loss, the compute cost it achieves there, exit shares
    decode      a short greedy generation with the early-exit decoder at τ and at full depth, timed in turns

One pass over each split serves every level (`collect_token_stats`); only decoding runs per level. A level no τ
reaches on the validation data is recorded as unreachable (with the reachable range), not raised. A method whose
compute cost no threshold sets (`fixed_cost`: e.g. mixture-of-depths) is evaluated once as it runs and placed at
the grid level nearest its cost, marked `fixed`; the other levels are unreachable for it.
"""

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ease.calibration import calibrate_threshold
from ease.evaluation import Batch, TokenStats, collect_token_stats
from ease.inference.generation import SamplingConfig, decode
from ease.model.backbone import Backbone

GRID_KEY = "compute_grid"  # the metrics.json key every run's grid lands under


@dataclass
class CompareConfig:
    """The `compare` group: the compute grid every run is scored at after training (empty: off).

    Attributes:
        compute_grid: compute-cost levels in (0, 1] (layers computed / total layers); [] = no grid evaluation.
        exit_layer: the exit the grid routes at; None = the run's routing.exit_layer (1 under routing=none).
        fixed_cost: the method's compute cost is not set by a threshold (its preset says so): evaluate it once
            and place it at the nearest level.
        decode_prompts, decode_prompt_len, decode_tokens: the timed greedy generation at each level (rows,
            prompt tokens taken from the test split's start, new tokens per row).
        decode_repeats: timed decodings per level; the fastest counts (the least disturbed by other processes).
        decode_threads: intra-op threads while decoding (None: torch's setting).
    """

    compute_grid: list[float] = field(default_factory=list)
    exit_layer: int | None = None
    fixed_cost: bool = False
    decode_prompts: int = 4
    decode_prompt_len: int = 16
    decode_tokens: int = 64
    decode_repeats: int = 5
    decode_threads: int | None = 1

    def __post_init__(self) -> None:
        for level in self.compute_grid:
            if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level <= 1.0:
                raise ValueError(f"compare.compute_grid: each level must be in (0, 1], got {level!r}")
        if len(set(self.compute_grid)) != len(self.compute_grid):
            raise ValueError(f"compare.compute_grid: levels must be distinct, got {list(self.compute_grid)}")
        if self.exit_layer is not None and (isinstance(self.exit_layer, bool) or self.exit_layer < 1):
            raise ValueError(f"compare.exit_layer: must be a layer >= 1 or null, got {self.exit_layer!r}")
        for key in ("decode_prompts", "decode_prompt_len", "decode_tokens", "decode_repeats"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"compare.{key}: must be an int >= 1, got {value!r}")
        if self.decode_threads is not None and self.decode_threads < 1:
            raise ValueError(f"compare.decode_threads: must be >= 1 or null, got {self.decode_threads!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.compute_grid)


def _split_metrics(stats: TokenStats, exit_layers: Sequence[int], threshold: float) -> dict[str, Any]:
    """The routed metrics of one pass at τ (threshold 0: full depth)."""
    routed = stats.routed(tuple(exit_layers), (threshold,) * len(exit_layers))
    return {k: routed[k] for k in ("ppl", "acc", "loss", "compute_cost", "shallow_ratio", "exit_fractions")}


def decode_prompt_ids(batches: Iterable[Batch], rows: int, length: int) -> torch.Tensor:
    """(rows, length) prompt ids: consecutive windows of the split's first tokens (fixed, so every run and
    level decodes the same prompts)."""
    chunks, need = [], rows * length
    for x, _ in batches:
        chunks.append(x.reshape(-1))
        if sum(c.numel() for c in chunks) >= need:
            break
    ids = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long)
    if ids.numel() < need:
        raise ValueError(
            f"compare.decode_prompts: {rows} prompts of {length} tokens need {need} tokens, the split has {ids.numel()}"
        )
    return ids[:need].reshape(rows, length)


def decoding_speed(
    model: Backbone,
    prompt_ids: torch.Tensor,
    exit_layers: Sequence[int],
    threshold: float,
    config: CompareConfig,
    confidence: str,
) -> dict[str, float]:
    """Tokens/s of greedy decoding at τ and at full depth, timed in alternating pairs (`decode_repeats` of
    each, after an untimed warm-up; the fastest of each counts), so load from other processes falls on both
    alike; and the compute cost the decoded tokens counted (mean exit layer / L)."""
    sampling = SamplingConfig(config.decode_tokens, 0.0, None, prompt_ids.shape[0], "propagate", "auto")
    warm = SamplingConfig(4, 0.0, None, prompt_ids.shape[0], "propagate", "auto")
    was_training = model.training
    model.eval()
    early, full = [], []
    try:
        for tau in (threshold, 0.0):
            decode(model, prompt_ids, warm, 0, list(exit_layers), tau, confidence, config.decode_threads)
        for _ in range(config.decode_repeats):
            early.append(decode(model, prompt_ids, sampling, 0, list(exit_layers), threshold, confidence,
                                config.decode_threads))  # fmt: skip
            full.append(decode(model, prompt_ids, sampling, 0, list(exit_layers), 0.0, confidence,
                               config.decode_threads))  # fmt: skip
    finally:
        model.train(was_training)
    best, best_full = min(early, key=lambda r: r.seconds), min(full, key=lambda r: r.seconds)
    tokens_per_s = best.tokens.numel() / max(best.seconds, 1e-9)
    full_tokens_per_s = best_full.tokens.numel() / max(best_full.seconds, 1e-9)
    return {
        "tokens_per_s": tokens_per_s,
        "full_depth_tokens_per_s": full_tokens_per_s,
        "speedup": tokens_per_s / full_tokens_per_s,
        "decode_compute_cost": best.exit_layers.double().mean().item() / model.num_layers,
    }


def grid_levels(
    val: TokenStats,
    test: TokenStats,
    exit_layers: Sequence[int],
    levels: Sequence[float],
) -> list[dict[str, Any]]:
    """Per level: τ calibrated on `val` (compute_cost), the `test` metrics at τ; unreachable levels recorded."""
    rows = []
    for level in levels:
        try:
            cal = calibrate_threshold(val, exit_layers, "compute_cost", float(level), key="compare.compute_grid")
        except ValueError as err:
            reachable = _reachable(val, exit_layers)
            rows.append({"target": float(level), "reachable": False, "fixed": False, "why": str(err),
                         "reachable_range": reachable})  # fmt: skip
            continue
        rows.append({
            "target": float(level), "reachable": True, "fixed": False, "threshold": cal.threshold,
            "val_compute_cost": cal.achieved, "reachable_range": list(cal.reachable),
            "test": _split_metrics(test, exit_layers, cal.threshold),
        })  # fmt: skip
    return rows


def _reachable(stats: TokenStats, exit_layers: Sequence[int]) -> list[float]:
    """compute_cost at the lowest and highest useful τ (every token exits / almost none does)."""
    low = stats.routed(tuple(exit_layers), (1e-9,) * len(exit_layers))["compute_cost"]
    high = stats.routed(tuple(exit_layers), (0.0,) * len(exit_layers))["compute_cost"]
    return [low, high]


def fixed_cost_levels(test_metrics: dict[str, Any], levels: Sequence[float]) -> list[dict[str, Any]]:
    """A method whose cost no threshold sets: its one test evaluation at the level nearest its cost, `fixed`."""
    cost = float(test_metrics["compute_cost"])
    nearest = min(levels, key=lambda level: (abs(level - cost), level))
    rows = []
    for level in levels:
        if level == nearest:
            rows.append({"target": float(level), "reachable": True, "fixed": True, "threshold": None,
                         "test": dict(test_metrics)})  # fmt: skip
        else:
            why = f"compute cost fixed at {cost:.4f} by the method (placed at level {nearest})"
            rows.append({"target": float(level), "reachable": False, "fixed": True, "why": why})
    return rows


def evaluate_grid(
    model: Backbone,
    val_batches: Iterable[Batch],
    test_batches: Iterable[Batch],
    config: CompareConfig,
    exit_layers: Sequence[int],
    confidence: str = "max_prob",
    device: str | torch.device = "cpu",
    fixed_test_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's `compute_grid` record: calibrated on val, scored on test, decoding timed per level.

    `fixed_test_metrics`: with `config.fixed_cost`, the method's own test metrics (ppl, acc, loss,
    compute_cost, ...) to place on the grid instead of calibrating.
    """
    t0 = time.perf_counter()
    levels = [float(level) for level in config.compute_grid]
    exits = sorted({int(e) for e in exit_layers})
    L = model.num_layers
    if any(not 1 <= e < L for e in exits):
        raise ValueError(f"compare.exit_layer: must be in 1..{L - 1} for a {L}-layer model, got {exits}")
    prompts = decode_prompt_ids(test_batches, config.decode_prompts, config.decode_prompt_len)
    prompts = prompts.to(next(model.parameters()).device)
    if config.fixed_cost:
        if fixed_test_metrics is None:
            raise ValueError("compare.fixed_cost: this run gives no test metrics to place on the grid")
        rows = fixed_cost_levels(fixed_test_metrics, levels)
        for row in rows:
            if row["reachable"]:
                row["decode"] = decoding_speed(model, prompts, exits, 0.0, config, confidence)  # as it runs
    else:
        val = collect_token_stats(model, val_batches, exits, confidence=confidence, device=device)
        test = collect_token_stats(model, test_batches, exits, confidence=confidence, device=device)
        rows = grid_levels(val, test, exits, levels)
        for row in rows:
            if row["reachable"]:
                row["decode"] = decoding_speed(model, prompts, exits, row["threshold"], config, confidence)
    return {
        "calibrated_on": "val",
        "evaluated_on": "test",
        "metric": "compute_cost",
        "exit_layers": exits,
        "confidence": confidence,
        "fixed_cost": config.fixed_cost,
        "decode": {
            "prompts": config.decode_prompts,
            "prompt_len": config.decode_prompt_len,
            "new_tokens": config.decode_tokens,
            "repeats": config.decode_repeats,
            "threads": config.decode_threads,
            "greedy": True,
        },
        "levels": rows,
        "time_s": time.perf_counter() - t0,
    }
