"""Incremental decoding over the backbone protocol, where each new token runs only the layers up to its exit.

`EarlyExitDecoder` is the reference decoder: it calls the backbone's own layers (`Backbone.layer` with the
backbone's KV cache) and its shared head, so it decodes any backbone, and it is what the native fast path
(`ease.inference.fused`) is tested against. A step feeds one token per row, runs the layers in order, and
at each routing exit scores the rows still running: a row whose confidence reaches the exit's threshold
stops there, and its logits at that layer are the step's output.

A token that stops at layer e leaves layers e+1..L without K/V at its position, which later tokens will
attend to. Two ways to fill them (`kv_mode`):

- ``"propagate"`` (CALM, Schuster et al. 2022): the exit hidden state is copied upward and the skipped
  layers compute only their K/V from it (`Backbone.layer` with the row inactive): no attention, no FFN.
  Cheap, but deeper layers then see K/V made from a shallower state than a full forward would give them,
  so later tokens' logits change (docs/speed.md).
- ``"recompute"``: the skipped positions stay pending; when a later token needs layer l, the pending
  positions run layer l for real, in one chunk with that token (as in FREE's parallel decoding, Bae et al.
  2023). Every K/V is then the exact one of a full forward, so the outputs equal a full forward routed token
  by token.

With several rows, each row stops at its own exit. In propagate mode a stopped row stays inactive in the
deeper layers (it only provides K/V); in recompute mode this decoder keeps the batch's positions aligned
(every row computes a layer that some row needs, exactly), and layers no row needs stay pending.

The prompt is prefilled at full depth (`prefill`); every generated token then comes from one `step`, whose
depth is that token's exit layer.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ease.exit_classifier import check_confidence
from ease.model.backbone import Backbone
from ease.routing import measure_confidence, normalize_routing

KV_MODES = ("propagate", "recompute")


def check_kv_mode(kv_mode: str) -> None:
    if kv_mode not in KV_MODES:
        raise ValueError(f"kv_mode: must be one of {', '.join(KV_MODES)}, got {kv_mode!r}")


def decoder_routing(
    model: Backbone,
    batch_size: int,
    max_len: int,
    exit_layer: int | Sequence[int] | None,
    routing_threshold: float | Sequence[float] | None,
    kv_mode: str,
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Check a decoder's settings; its routing (the model's own where None), validated for the model."""
    check_kv_mode(kv_mode)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if max_len < 1:
        raise ValueError(f"max_len: must be >= 1, got {max_len}")
    exits = model.exit_layers if exit_layer is None else exit_layer
    thresholds = model.routing_thresholds if routing_threshold is None else routing_threshold
    return normalize_routing(exits, thresholds, model.num_layers)


@dataclass
class StepOutput:
    """One decoding step: each row's logits at its exit layer, and that layer."""

    logits: torch.Tensor  # (B, V)
    exit_layer: torch.Tensor  # (B,) long, in 1..num_layers
    # with return_layers: {layer: (B, V)} for every layer some row ran; NaN in the rows that did not run it
    layer_logits: dict[int, torch.Tensor] | None = None


class EarlyExitDecoder:
    """KV-cached decoding of any backbone where every token stops at its confidence exit.

    Args:
        model: the backbone (put it in eval mode: decoding is inference).
        batch_size: rows decoded together; every row advances one position per step.
        max_len: positions the caches hold (prompt + generated tokens).
        exit_layer: routing exit(s); None = the model's own.
        routing_threshold: threshold(s); None = the model's own; 0 = no early exit (full depth).
        kv_mode: "propagate" or "recompute" (see the module docstring).
        confidence: confidence measure; None = the model's own.

    Attributes:
        layer_tokens: (token, layer) pairs run through a full layer so far (recomputed positions count).
        kv_tokens: (token, layer) pairs that got only a propagated K/V projection.
    """

    def __init__(
        self,
        model: Backbone,
        batch_size: int = 1,
        max_len: int = 256,
        exit_layer: int | Sequence[int] | None = None,
        routing_threshold: float | Sequence[float] | None = None,
        kv_mode: str = "propagate",
        confidence: str | None = None,
    ) -> None:
        routing = decoder_routing(model, batch_size, max_len, exit_layer, routing_threshold, kv_mode)
        self.exit_layers, self.routing_thresholds = routing
        self.model = model
        self.kv_mode = kv_mode
        self.batch_size = batch_size
        self.max_len = max_len
        self.num_layers = model.num_layers
        # thresholds[l]: the threshold of an active exit at layer l (1-indexed), else None.
        self.thresholds: dict[int, float] = {e: t for e, t in zip(self.exit_layers, self.routing_thresholds) if t > 0}
        self.confidence = confidence or model.confidence
        check_confidence(model, self.confidence, self.thresholds)
        self.device = next(model.parameters()).device
        self.reset()

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """New values for the active exits' thresholds, one per `exit_layers` entry (CALM's decaying threshold
        changes them between steps). An exit that was off (threshold 0) stays off."""
        self.thresholds = {e: t for e, t in zip(self.exit_layers, thresholds) if e in self.thresholds}

    def reset(self) -> None:
        """Forget every position."""
        self.pos = 0
        self.layer_tokens = 0
        self.kv_tokens = 0
        self.cache = self.model.new_cache(self.batch_size, self.max_len)
        # recompute: filled[l] = positions whose layer-l K/V are computed; pending[l] = layer l's inputs
        # (B, 1, C) at positions filled[l]..filled[l-1]-1, waiting for a token that needs layer l.
        self.filled = [0] * (self.num_layers + 1)
        self.pending: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers + 1)]

    def _room(self, n: int) -> None:
        if self.pos + n > self.max_len:
            raise ValueError(f"max_len: the caches hold {self.max_len} positions, {self.pos + n} needed")

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, return_layers: bool = False) -> dict[int, torch.Tensor] | None:
        """Run a chunk of tokens (B, m) through every layer, filling the caches; no routing (a prompt).

        Returns {layer: logits (B, m, V)} for every layer with `return_layers`, else None.
        """
        batch, m = ids.shape
        if batch != self.batch_size:
            raise ValueError(f"prefill: ids must have batch size {self.batch_size}, got {batch}")
        self._room(m)
        if any(f < self.pos for f in self.filled[1:]):
            raise ValueError("prefill: positions are pending (recompute mode); prefill only before stepping")
        h = self.model.embed(ids, self.pos)  # (B, m, C)
        out = {} if return_layers else None
        for i in range(1, self.num_layers + 1):
            h = self.model.layer(i, h, self.pos, self.cache)
            self.layer_tokens += batch * m
            if out is not None:
                out[i] = self.model.unembed(h)
        self.pos += m
        self.filled = [self.pos] * (self.num_layers + 1)
        return out

    def _recompute_layer(self, i: int, h: torch.Tensor, t: int) -> torch.Tensor:
        """Layer i for the token at t (B, 1, C), first running it on its pending positions, in one chunk."""
        chunk = torch.cat([*self.pending[i], h], dim=1)  # (B, P+1, C): positions filled[i]..t
        out = self.model.layer(i, chunk, self.filled[i], self.cache)
        self.layer_tokens += chunk.shape[0] * chunk.shape[1]
        if i < self.num_layers:  # the pending positions' outputs now wait for layer i+1
            self.pending[i + 1].extend(out[:, :-1].split(1, dim=1))
        self.pending[i], self.filled[i] = [], t + 1
        return out[:, -1:]

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, return_layers: bool = False) -> StepOutput:
        """Feed one token per row (B,) at the next position; each row runs until its exit.

        With `return_layers`, also returns each computed layer's logits (a head at every layer).
        """
        B, L, t = self.batch_size, self.num_layers, self.pos
        if ids.shape != (B,):
            raise ValueError(f"step: ids must have shape ({B},), got {tuple(ids.shape)}")
        self._room(1)
        model = self.model
        h = model.embed(ids[:, None], t)  # (B, 1, C)
        running = torch.ones(B, dtype=torch.bool, device=self.device)
        logits_out: torch.Tensor | None = None
        exit_out = torch.full((B,), L, dtype=torch.long, device=self.device)
        layer_logits: dict[int, torch.Tensor] | None = {} if return_layers else None
        for i in range(1, L + 1):
            previous = h  # layer i's input (B, 1, C): saturation compares the exit state with it
            n_running = int(running.sum())
            if self.kv_mode == "recompute":
                h = self._recompute_layer(i, h, t)
            elif n_running == B:
                h = model.layer(i, h, t, self.cache)
                self.layer_tokens += B
            else:  # stopped rows keep their exit state and only provide K/V (propagation)
                h = model.layer(i, h, t, self.cache, active=running[:, None])
                self.layer_tokens += n_running
                self.kv_tokens += B - n_running
            threshold = self.thresholds.get(i)
            if layer_logits is None and threshold is None and i < L:
                continue
            logits = model.unembed(h[:, 0]).float()  # (B, V)
            if logits_out is None:
                logits_out = torch.full_like(logits, float("nan"))
            if layer_logits is not None:
                layer_logits[i] = torch.where(running[:, None], logits, torch.full_like(logits, float("nan")))
            if i == L:
                logits_out[running] = logits[running]
                break
            if threshold is None:
                continue
            conf = measure_confidence(model, self.confidence, i, logits, h[:, 0], previous[:, 0])
            stop = running & (conf >= threshold)
            logits_out[stop] = logits[stop]
            exit_out[stop] = i
            running &= ~stop
            if not running.any():
                self._leave(i, h, t)
                break
        self.pos = t + 1
        return StepOutput(logits_out, exit_out, layer_logits)

    def _leave(self, e: int, h: torch.Tensor, t: int) -> None:
        """Every row stopped after layer e: give layers e+1..L what later tokens will attend to at position t."""
        if self.kv_mode == "recompute":
            self.pending[e + 1].append(h)  # computed when a later token needs layer e+1
            return
        none = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
        for i in range(e + 1, self.num_layers + 1):
            self.model.layer(i, h, t, self.cache, active=none)  # K/V only, from the exit state
            self.kv_tokens += h.shape[0]
