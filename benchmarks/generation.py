"""(c) generation speed with real early exit, against full depth with the same cache code.

A model of the seeds' size is trained briefly with deep supervision (every exit learns, as in DEED) so that
the layer-1 exit is real. For each target share of early exits (30/50/70%), the layer-1 threshold is
calibrated on short seeded generations (`calibrate`); then generation is timed with that threshold and with routing off,
alternating the two so that drift in the machine's load hits both alike. Speedup = median over repeats of
(full-depth time / early-exit time) for the same number of tokens. Theoretical = 1 / compute_cost of the
same run (compute_cost = mean exit layer / num_layers), the figure papers report. `flop_speedup` is the
analytic FLOP ratio of the same run, which also counts the exit heads and the propagated K/V projections.
"""

import statistics
from typing import Any

import torch

from benchmarks.common import method_weights
from benchmarks.flops import decode_flops
from ease import EarlyExitTransformer, Trainer, TrainingConfig
from ease.data import DataBundle
from ease.inference.generation import SamplingConfig, decode
from ease.routing import max_prob

TARGETS = (0.3, 0.5, 0.7)
SAMPLING = {"temperature": 0.8, "top_k": 40}  # sampled text; greedy text of a small model loops


def train_brief(data: DataBundle, dim: int, num_layers: int, num_heads: int, epochs: int) -> EarlyExitTransformer:
    """A few epochs of deep supervision (uniform loss on every exit), so every exit predicts something."""
    torch.manual_seed(0)
    model = EarlyExitTransformer(data.vocab_size, dim, num_layers, num_heads=num_heads)
    trainer = Trainer(TrainingConfig(layer_weights=method_weights("deep_supervision", num_layers)))
    optimizer = trainer.create_optimizer(model, 3e-3)
    for _ in range(epochs):
        trainer.train_epoch(model, data.train, optimizer)
    return model.eval()


def early_fraction(exits: torch.Tensor, num_layers: int) -> float:
    return (exits < num_layers).double().mean().item()


@torch.no_grad()
def calibrate(model: EarlyExitTransformer, prompt: torch.Tensor, target: float, tokens: int, refine: int = 8) -> float:
    """Layer-1 threshold whose generation (batch 1, seeded) stops about `target` of the tokens early.

    The early share of a sampled generation is not monotone in the threshold (each threshold changes the
    text), so bisection can stall. Instead: take the layer-1 confidences along a full-depth generation,
    try thresholds at quantiles around 1 - target, and keep the one whose own generation comes closest.
    """
    sampling = SamplingConfig(tokens, **SAMPLING)
    full = decode(model, prompt, sampling, seed=0, exit_layer=1, routing_threshold=0.0)
    text = torch.cat((prompt, full.tokens), dim=1)[:, :-1]
    confidence = max_prob(model(text, [1])[1])[0, prompt.shape[1] - 1 :]  # at each generating position
    tried: dict[float, float] = {}  # threshold -> early share of its own generation

    def early(threshold: float) -> float:
        if threshold not in tried:
            run = decode(model, prompt, sampling, seed=0, exit_layer=1, routing_threshold=threshold)
            tried[threshold] = early_fraction(run.exit_layers, model.num_layers)
        return tried[threshold]

    for level in torch.linspace(-0.3, 0.3, 13) + (1 - target):
        threshold = confidence.quantile(level.clamp(0.0, 1.0)).item()
        if 0 < threshold <= 1:
            early(threshold)
    for _ in range(refine):  # bisect between the closest thresholds on either side of the target
        below = [t for t, f in tried.items() if f >= target]  # low thresholds stop more tokens
        above = [t for t, f in tried.items() if f < target]
        if not below or not above:
            break
        early((max(below) + min(above)) / 2)
    return min(tried, key=lambda t: abs(tried[t] - target))


def time_pair(
    model: EarlyExitTransformer, prompt: torch.Tensor, threshold: float, tokens: int, repeats: int, kv_mode: str
) -> dict[str, Any]:
    """Early exit vs full depth, alternating, the same seed (the same tokens every repeat)."""
    sampling = SamplingConfig(tokens, **SAMPLING, batch_size=prompt.shape[0], kv_mode=kv_mode)
    L = model.num_layers

    def routed():
        return decode(model, prompt, sampling, seed=0, exit_layer=1, routing_threshold=threshold)

    def full():
        return decode(model, prompt, sampling, seed=0, exit_layer=1, routing_threshold=0.0)

    routed(), full()  # warm-up
    ratios, routed_s, full_s = [], [], []
    run = None
    for r in range(repeats):
        if r % 2:
            f, run = full(), routed()
        else:
            run, f = routed(), full()
        ratios.append(f.seconds / run.seconds)
        routed_s.append(run.seconds)
        full_s.append(f.seconds)
    n = run.tokens.numel()
    cost = run.exit_layers.double().mean().item() / L
    speedup = statistics.median(ratios)
    # The FLOP view of the same run: an early token pays its layers, its exit head and the skipped layers'
    # K/V projections; a deep one pays every layer plus the layer-1 exit head it passed.
    context = prompt.shape[1] + tokens / 2
    V, C = model.vocab_size, model.dim
    per_exit = {
        e: decode_flops(C, L, V, context, e, 1 if e < L else 2, L - e) for e in range(1, L + 1)
    }  # fmt: skip
    routed_flops = sum(per_exit[int(e)] for e in run.exit_layers.flatten()) / n
    full_flops = decode_flops(C, L, V, context, L, 1, 0)
    return {
        "batch_size": prompt.shape[0],
        "kv_mode": kv_mode,
        "threshold": threshold,
        "early_exit_fraction": early_fraction(run.exit_layers, L),
        "compute_cost": cost,
        "tokens_per_s": n / statistics.median(routed_s),
        "full_depth_tokens_per_s": n / statistics.median(full_s),
        "speedup": speedup,
        "theoretical_speedup": 1.0 / cost,
        "speedup_over_theoretical": speedup * cost,
        "flop_speedup": full_flops / routed_flops,
        "speedup_min_max": [min(ratios), max(ratios)],
        "tokens": n,
        "repeats": repeats,
    }


def run_generation(
    model: EarlyExitTransformer, data: DataBundle, tokens: int, repeats: int, calibration_tokens: int
) -> dict[str, Any]:
    prompt = next(iter(data.val))[0][:1, :16]  # (1, 16): the start of the validation text
    rows = []
    thresholds = {}
    for target in TARGETS:
        thresholds[target] = calibrate(model, prompt, target, calibration_tokens)
        for batch in (1, 8):
            row = time_pair(
                model, prompt.expand(batch, -1).contiguous(), thresholds[target], tokens, repeats, "propagate"
            )
            rows.append({"target_early_fraction": target, **row})
    recompute = time_pair(model, prompt, thresholds[0.5], tokens, repeats, "recompute")
    rows.append({"target_early_fraction": 0.5, **recompute})
    b1 = next(r for r in rows if r["target_early_fraction"] == 0.5 and r["batch_size"] == 1)
    return {
        "rows": rows,
        "speedup_over_theoretical_b1": b1["speedup_over_theoretical"],
        "speedup_b1": b1["speedup"],
        "theoretical_speedup_b1": b1["theoretical_speedup"],
        "sampling": SAMPLING,
        "prompt_tokens": prompt.shape[1],
        "decode_threads": 1,
    }
