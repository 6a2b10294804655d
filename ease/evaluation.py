"""Evaluation in one pass: per-token statistics, routed metrics, and the threshold curve.

One forward pass over the data keeps, for every routing exit and the last layer, each token's confidence,
NLL and correctness. Any routing setting (a threshold, or a cascade of thresholds) is then scored from
those tensors without running the model again, so a threshold table of K rows costs one pass, not K.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ease.exit_classifier import check_confidence
from ease.model.backbone import Backbone, exit_logits, exit_states
from ease.routing import confidence_fn, measure_confidence, needs_hidden, normalize_routing, route_from_confidences
from ease.stop import check_stop

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TokenStats:
    """Per-token statistics of one pass; tensors are (N,) over every evaluated token."""

    num_layers: int
    confidence: dict[int, torch.Tensor] = field(default_factory=dict)  # routing exits only
    nll: dict[int, torch.Tensor] = field(default_factory=dict)  # routing exits and the last layer
    correct: dict[int, torch.Tensor] = field(default_factory=dict)
    argmax: dict[int, torch.Tensor] = field(default_factory=dict)  # routing exits and the last layer (LTT's risk)
    layer_nll_sum: dict[int, float] = field(default_factory=dict)  # every reported layer
    layer_correct: dict[int, int] = field(default_factory=dict)
    num_tokens: int = 0

    def per_exit(self) -> dict[int, dict[str, float]]:
        """Unrouted quality of each reported layer: every token scored at that layer."""
        n = max(self.num_tokens, 1)
        return {
            layer: {
                "loss": self.layer_nll_sum[layer] / n,
                "ppl": math.exp(min(self.layer_nll_sum[layer] / n, 700.0)),
                "acc": self.layer_correct[layer] / n,
            }
            for layer in sorted(self.layer_nll_sum)
        }

    def routed(self, exit_layers: Sequence[int], thresholds: Sequence[float]) -> dict[str, float]:
        """ppl, acc, shallow_ratio and compute_cost when tokens route with these thresholds."""
        if self.num_tokens == 0:
            raise ValueError("evaluate: the evaluation batches are empty")
        L = self.num_layers
        active = {e: t for e, t in zip(exit_layers, thresholds) if t > 0}
        if active:
            exit_at = route_from_confidences({e: self.confidence[e] for e in active}, active, L)
        else:
            exit_at = torch.full((self.num_tokens,), L, dtype=torch.long)
        nll = self.nll[L].clone()
        correct = self.correct[L].clone()
        for e in active:
            chosen = exit_at == e
            nll[chosen] = self.nll[e][chosen]
            correct[chosen] = self.correct[e][chosen]
        mean_nll = nll.double().mean().item()
        out = {
            "loss": mean_nll,
            "ppl": math.exp(min(mean_nll, 700.0)),
            "acc": correct.double().mean().item(),
            "shallow_ratio": (exit_at < L).double().mean().item(),
            "compute_cost": exit_at.double().mean().item() / L,
        }
        out["exit_fractions"] = {int(e): (exit_at == e).double().mean().item() for e in [*active, L]}
        return out


@torch.no_grad()
def collect_token_stats(
    model: Backbone,
    batches: Iterable[Batch],
    exit_layers: Sequence[int],
    report_layers: Iterable[int] = (),
    confidence: str = "max_prob",
    device: str | torch.device = "cpu",
) -> TokenStats:
    """One pass over `batches`; heads run only at exit, report and last layers.

    A hidden-state measure (saturation, classifier) also keeps the state before each exit (the embedding for
    layer 1); logit measures take the same path as always.
    """
    L = model.num_layers
    measure = None if needs_hidden(confidence) else confidence_fn(confidence)
    check_confidence(model, confidence, exit_layers)
    tracked = sorted({*exit_layers, L})
    layers = sorted({*tracked, *report_layers})
    stats = TokenStats(num_layers=L)
    parts: dict[str, dict[int, list[torch.Tensor]]] = {"confidence": {}, "nll": {}, "correct": {}, "argmax": {}}
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            check_stop()  # evaluation passes over large data stop between batches too
            x, y = x.to(device), y.to(device)
            if measure is None:
                states = exit_states(model, x, layers, {e - 1 for e in exit_layers})
                logits = {layer: model.unembed(states[layer]) for layer in layers}
            else:
                logits = exit_logits(model, x, layers)
            target = y.reshape(-1)
            stats.num_tokens += target.numel()
            for layer in layers:
                flat = logits[layer].reshape(-1, logits[layer].shape[-1]).float()  # (N, V)
                nll = F.cross_entropy(flat, target, reduction="none")  # (N,)
                pred = flat.argmax(-1)
                correct = pred == target
                stats.layer_nll_sum[layer] = stats.layer_nll_sum.get(layer, 0.0) + nll.double().sum().item()
                stats.layer_correct[layer] = stats.layer_correct.get(layer, 0) + int(correct.sum().item())
                if layer in tracked:
                    parts["nll"].setdefault(layer, []).append(nll.cpu())
                    parts["correct"].setdefault(layer, []).append(correct.cpu())
                    parts["argmax"].setdefault(layer, []).append(pred.cpu())
                if layer in exit_layers:
                    if measure is None:
                        C = states[layer].shape[-1]
                        hidden, previous = states[layer].reshape(-1, C), states[layer - 1].reshape(-1, C)
                        conf = measure_confidence(model, confidence, layer, flat, hidden, previous)
                    else:
                        conf = measure(flat)
                    parts["confidence"].setdefault(layer, []).append(conf.cpu())
    finally:
        model.train(was_training)
    for name, per_layer in parts.items():
        setattr(stats, name, {layer: torch.cat(chunks) for layer, chunks in per_layer.items()})
    return stats


def merge_token_stats(parts: Sequence[TokenStats]) -> TokenStats:
    """One TokenStats from several ranks' (each over its share of the tokens), as if from one pass."""
    merged = TokenStats(num_layers=parts[0].num_layers)
    for name in ("confidence", "nll", "correct", "argmax"):
        layers = getattr(parts[0], name)
        setattr(merged, name, {layer: torch.cat([getattr(p, name)[layer] for p in parts]) for layer in layers})
    for layer in parts[0].layer_nll_sum:
        merged.layer_nll_sum[layer] = sum(p.layer_nll_sum[layer] for p in parts)
        merged.layer_correct[layer] = sum(p.layer_correct[layer] for p in parts)
    merged.num_tokens = sum(p.num_tokens for p in parts)
    return merged


def threshold_rows(
    stats: TokenStats,
    exit_layers: Sequence[int],
    thresholds: Iterable[float | Sequence[float]],
) -> list[dict]:
    """Seed 003's threshold table from one pass: threshold, ppl, acc, shallow%, compute%.

    Each entry of `thresholds` is one value for every exit layer or one value per exit layer (a cascade).
    """
    rows = []
    for threshold in thresholds:
        exits, ts = normalize_routing(tuple(exit_layers), threshold, stats.num_layers)
        metrics = stats.routed(exits, ts)
        metrics.pop("exit_fractions")
        rows.append({"threshold": float(threshold) if isinstance(threshold, (int, float)) else list(ts), **metrics})
    return rows


DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
