"""(b) the cost of threshold analysis with K=1 and K=10 thresholds, and routed evaluation, counted vs skipping.

Threshold analysis (`Trainer.threshold_analysis`) runs the model once and scores every threshold from the
per-token statistics, so K=10 should cost about what K=1 costs. The two are timed alternately `repeats`
times; the minimum of each is kept (the least disturbed run on a shared CPU).

Routed evaluation at the threshold that stops half the validation tokens at layer 1: the counted mode (every
layer for every token) against `skip_routed_forward` in both K/V modes, time beside compute_cost.
"""

import time
from typing import Any

import torch

from benchmarks.common import method_weights
from benchmarks.flops import block_flops, head_flops
from ease import EarlyExitTransformer, Trainer, TrainingConfig
from ease.data import DataBundle
from ease.inference.routed_eval import evaluate_routed
from ease.routing import max_prob

K10 = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_threshold_cost(model: EarlyExitTransformer, data: DataBundle, repeats: int) -> dict[str, Any]:
    """K=1 and K=10 timed alternately `repeats` times; the minimum of each (the least disturbed run)."""
    L = model.num_layers
    trainer = Trainer(TrainingConfig(layer_weights=method_weights("deep_supervision", L), exit_layer=1))
    trainer.threshold_analysis(model, data.val, [0.9])  # warm-up
    k1, k10 = [], []
    for _ in range(repeats):
        k1.append(_timed(lambda: trainer.threshold_analysis(model, data.val, [0.9])))
        k10.append(_timed(lambda: trainer.threshold_analysis(model, data.val, K10)))
    return {
        "threshold_k1_s": min(k1),
        "threshold_k10_s": min(k10),
        "threshold_k10_over_k1": min(k10) / min(k1),
        "repeats": repeats,
    }


@torch.no_grad()
def median_threshold(model: EarlyExitTransformer, data: DataBundle) -> float:
    """The layer-1 confidence that half the validation tokens reach."""
    conf = torch.cat([max_prob(model(x, [1])[1]).flatten() for x, _ in data.val])
    return conf.median().item()


def run_routed_eval(model: EarlyExitTransformer, data: DataBundle, repeats: int) -> dict[str, Any]:
    threshold = median_threshold(model, data)
    rows = []
    settings = [
        ("full depth", "counted", "propagate", 0.0),
        ("counted", "counted", "propagate", threshold),
        ("skip, propagate", "skip", "propagate", threshold),
        ("skip, recompute", "skip", "recompute", threshold),
    ]
    for name, mode, kv_mode, t in settings:
        evaluate_routed(model, data.val, mode, kv_mode, 1, t)  # warm-up
        best = None
        for _ in range(repeats):
            result = evaluate_routed(model, data.val, mode, kv_mode, 1, t)
            if best is None or result["time_s"] < best["time_s"]:
                best = result
        keys = ("ppl", "acc", "shallow_ratio", "compute_cost", "layer_fraction", "kv_fraction", "heads_per_token")
        rows.append({"setting": name, "threshold": t, "time_s": best["time_s"], **{k: best[k] for k in keys}})
    L, C, V, T = model.num_layers, model.dim, model.vocab_size, data.val.seq_len
    block, head, kv = block_flops(C, T), head_flops(C, V), 2 * C * 2 * C
    for row in rows:
        row["flops_per_token"] = (
            L * (row["layer_fraction"] * block + row["kv_fraction"] * kv) + row["heads_per_token"] * head
        )
    full_time, full_flops = rows[0]["time_s"], rows[0]["flops_per_token"]
    for row in rows:
        row["time_over_full_depth"] = row["time_s"] / full_time
        row["flops_over_full_depth"] = row["flops_per_token"] / full_flops
    return {"threshold": threshold, "rows": rows}
