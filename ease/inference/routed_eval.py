"""Routed full-sequence evaluation that really skips compute, timed beside the counted mode.

The counted mode (`ease.model.backbone.routed_forward`, and `ease.evaluation`) runs every layer for every
token and then scores each token at its exit: its compute_cost is a count, not a saving. `skip_routed_forward`
runs each layer only for the tokens still going, through the backbone protocol (`Backbone.layer` with
`active`, so the model's own blocks do the work):

- Layers up to the first routing exit run for every token, exactly as in the model's forward.
- At each exit, the head runs only for the tokens still going; those confident enough stop there.
- Above that, with ``kv_mode="propagate"`` (CALM), a stopped token gets only the K/V projections of the
  deeper layers, made from its frozen exit state; attention queries, the output projection and the FFN run
  only for the tokens still going. With ``kv_mode="recompute"``, a stopped token keeps running a layer only
  while a later token of its row still needs that layer's K/V (positions up to the row's last running
  token); everything after is skipped, so each K/V is exact.

When the two modes agree (what the tests check):

- Tokens that stop at the first routing exit have run the same layers on the same inputs as in the counted
  mode, so the exit decisions there, and those tokens' logits, are identical. With a single routing exit,
  shallow_ratio and compute_cost are therefore always identical.
- ``recompute`` gives every token the same hidden states as a full forward: ppl, acc and shallow_ratio equal
  the counted mode's for any thresholds (up to float rounding of the shorter matmuls).
- ``propagate`` changes what a deeper token attends to when an earlier token of its row stopped below that
  depth. ppl/acc equal the counted mode's only when no such pair exists: no token stops (threshold 0 or
  above every confidence), every token stops at the first exit, or within each row every stopped token
  comes after every token that goes deeper. Otherwise the difference is the quality cost of propagation,
  which `evaluate_routed` measures.
"""

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ease.evaluation import Batch
from ease.exit_classifier import check_confidence
from ease.inference.decoder import check_kv_mode
from ease.model.backbone import Backbone, RoutedOutput, routed_forward
from ease.routing import measure_confidence, normalize_routing

EVAL_MODES = ("counted", "skip")


@dataclass
class SkipOutput(RoutedOutput):
    """Routed logits and exits, plus what was computed (in token x layer units)."""

    layer_tokens: int = 0  # tokens run through a full block, summed over layers
    kv_tokens: int = 0  # tokens given only propagated K/V, summed over layers
    head_tokens: int = 0  # tokens put through the head, summed over exits


@torch.inference_mode()
def skip_routed_forward(
    model: Backbone,
    x: torch.Tensor,
    exit_layer: int | Sequence[int] | None = None,
    routing_threshold: float | Sequence[float] | None = None,
    kv_mode: str = "propagate",
) -> SkipOutput:
    """Confidence routing over a whole sequence x (B, T) that runs each layer only where needed.

    Same routing rule and output as `routed_forward` (the counted mode); see the module docstring
    for when the logits are identical. The model should be in eval mode.
    """
    check_kv_mode(kv_mode)
    L = model.num_layers
    exits, thresholds = normalize_routing(
        model.exit_layers if exit_layer is None else exit_layer,
        model.routing_thresholds if routing_threshold is None else routing_threshold,
        L,
    )
    check_confidence(model, model.confidence, [e for e, t in zip(exits, thresholds) if t > 0])

    def measure(e: int, logits: torch.Tensor, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return measure_confidence(model, model.confidence, e, logits, hidden, previous)

    B, T = x.shape
    h = model.embed(x)  # (B, T, C)
    C = h.shape[-1]
    running = torch.ones(B, T, dtype=torch.bool, device=x.device)
    exit_at = torch.full((B, T), L, dtype=torch.long, device=x.device)
    logits = None
    out = SkipOutput(logits=torch.empty(0), exit_layer=exit_at)
    done = 0  # layers applied so far
    for e, threshold in [*[(e, t) for e, t in zip(exits, thresholds) if t > 0], (L, None)]:
        previous = h
        for i in range(done + 1, e + 1):
            previous = h  # layer e's input: what saturation compares the exit state with
            h = _run_layer(model, i, h, running, kv_mode, out)
        done = e
        if done == L or not running.any():
            break
        if bool(running.all()):  # e.g. the first exit: the head on the full batch, as the counted mode does
            exit_logits = model.unembed(h)  # (B, T, V)
            stop = measure(e, exit_logits, h, previous) >= threshold  # (B, T)
            out.head_tokens += B * T
            if logits is None:
                logits = torch.empty_like(exit_logits)
            logits[stop] = exit_logits[stop]
        else:
            flat = running.view(-1).nonzero().squeeze(1)  # (Na,)
            exit_logits = model.unembed(h.view(B * T, C)[flat])  # (Na, V)
            hit = measure(e, exit_logits, h.view(B * T, C)[flat], previous.reshape(B * T, C)[flat]) >= threshold
            out.head_tokens += flat.numel()
            logits.view(B * T, -1)[flat[hit]] = exit_logits[hit]
            stop = torch.zeros_like(running)
            stop.view(-1)[flat[hit]] = True
        exit_at[stop] = e
        running &= ~stop
    if running.any():
        if bool(running.all()):
            final = model.unembed(h)
            out.head_tokens += B * T
            if logits is None:
                logits = final
            else:
                logits[running] = final[running]
        else:
            flat = running.view(-1).nonzero().squeeze(1)
            logits.view(B * T, -1)[flat] = model.unembed(h.view(B * T, C)[flat])
            out.head_tokens += flat.numel()
    out.logits = logits
    return out


def _run_layer(
    model: Backbone, i: int, h: torch.Tensor, running: torch.Tensor, kv_mode: str, out: SkipOutput
) -> torch.Tensor:
    B, T, _ = h.shape
    n_running = int(running.sum())
    if n_running == B * T:  # nobody stopped yet: the plain layer, bit for bit
        out.layer_tokens += B * T
        return model.layer(i, h)
    if n_running == 0:  # nothing above needs this layer
        return h
    if kv_mode == "propagate":
        out.layer_tokens += n_running
        out.kv_tokens += B * T - n_running
        return model.layer(i, h, active=running)
    # recompute: positions up to each row's last running token are still needed; run the layer on that
    # prefix (the longest row's), exactly, and leave the tail of every row alone.
    positions = torch.arange(1, T + 1, device=h.device)
    P = int((running * positions).amax())
    out.layer_tokens += B * P
    h = h.clone()
    h[:, :P] = model.layer(i, h[:, :P])
    return h


@torch.no_grad()
def evaluate_routed(
    model: Backbone,
    batches: Iterable[Batch],
    mode: str = "skip",
    kv_mode: str = "propagate",
    exit_layer: int | Sequence[int] | None = None,
    routing_threshold: float | Sequence[float] | None = None,
) -> dict[str, Any]:
    """Routed ppl, acc, shallow_ratio and compute_cost, with the measured forward time.

    mode "counted" runs every layer (`routed_forward`); "skip" runs `skip_routed_forward`.
    `time_s` is the wall time of the forward passes only (not the loss). `layer_fraction` is the share
    of (token, layer) block computations actually run, `kv_fraction` the share given propagated K/V only,
    `heads_per_token` the exit heads (norm + output projection) run per token.
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"mode: must be one of {', '.join(EVAL_MODES)}, got {mode!r}")
    check_kv_mode(kv_mode)
    L = model.num_layers
    exits, thresholds = normalize_routing(
        model.exit_layers if exit_layer is None else exit_layer,
        model.routing_thresholds if routing_threshold is None else routing_threshold,
        L,
    )
    was_training = model.training
    model.eval()
    nll_sum, correct, tokens, seconds = 0.0, 0, 0, 0.0
    exit_counts = torch.zeros(L + 1, dtype=torch.long)
    layer_tokens = kv_tokens = head_tokens = 0
    active = sum(1 for t in thresholds if t > 0)
    try:
        for x, y in batches:
            start = time.perf_counter()
            if mode == "counted":
                out = routed_forward(model, x, exits, thresholds)
                layer_tokens += x.numel() * L
                head_tokens += x.numel() * (active + 1)  # every active exit's head and the last layer's
            else:
                out = skip_routed_forward(model, x, exits, thresholds, kv_mode)
                layer_tokens += out.layer_tokens
                kv_tokens += out.kv_tokens
                head_tokens += out.head_tokens
            seconds += time.perf_counter() - start
            flat = out.logits.reshape(-1, out.logits.shape[-1]).float()
            target = y.reshape(-1)
            nll_sum += F.cross_entropy(flat, target, reduction="none").double().sum().item()
            correct += int((flat.argmax(-1) == target).sum())
            tokens += target.numel()
            exit_counts += torch.bincount(out.exit_layer.reshape(-1).cpu(), minlength=L + 1)
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("evaluate_routed: the evaluation batches are empty")
    loss = nll_sum / tokens
    mean_layer = float((exit_counts * torch.arange(L + 1)).sum()) / tokens
    return {
        "mode": mode,
        "kv_mode": kv_mode if mode == "skip" else None,
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "acc": correct / tokens,
        "shallow_ratio": float(exit_counts[:L].sum()) / tokens,
        "compute_cost": mean_layer / L,
        "exit_fractions": {int(e): float(exit_counts[e]) / tokens for e in range(1, L + 1) if exit_counts[e] > 0},
        "layer_fraction": layer_tokens / (tokens * L),
        "kv_fraction": kv_tokens / (tokens * L),
        "heads_per_token": head_tokens / tokens,
        "time_s": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
    }
