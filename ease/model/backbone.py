"""The backbone protocol: the few operations training, evaluation, ASHEM surgery and decoding use.

Everything in EASE that runs a model speaks to it through `Backbone` alone: embed the ids, run decoder layer i
(with an optional KV cache, at a position, optionally for a subset of the tokens), unembed through the shared
final norm + head, the number of layers, the parameter groups (embedding, each layer, head) that per-layer
learning rates and freezing act on, and a deeper copy for ASHEM's growth. The native `EarlyExitTransformer`
implements it; a second backbone (a Hugging Face causal LM) plugs in by implementing the same methods.

Layers are 1-indexed: layer 1 is the first decoder layer, layer `num_layers` the last. A layer's input is the
previous layer's output (the embedding for layer 1), its output the hidden state before the shared norm.

The functions below are the protocol's shared compositions (every backbone gets them for free): the hidden
states after chosen layers, a range of layers, and the logits of chosen exits.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ease.routing import (
    measure_confidence,
    needs_hidden,
    normalize_routing,
    route_by_confidence,
    route_from_confidences,
)


@dataclass
class RoutedOutput:
    """Per-token routed logits and the layer each token exited at."""

    logits: torch.Tensor  # (B, T, V): each token scored by the logits of its exit layer
    exit_layer: torch.Tensor  # (B, T) long, in 1..num_layers


@runtime_checkable
class Backbone(Protocol):
    """An early-exit language model as EASE uses it.

    Attributes:
        num_layers: decoder layers L.
        vocab_size: output classes of the head.
        exit_layers: the routing exits, ascending (1-indexed, below L when active).
        routing_thresholds: one confidence threshold per exit (0 = that exit is off).
        confidence: the confidence measure routing uses ("max_prob", "top2_margin", "neg_entropy", or the
            hidden-state ones "saturation" and "classifier", the latter through an `exit_classifier` submodule).
    """

    num_layers: int
    vocab_size: int
    exit_layers: tuple[int, ...]
    routing_thresholds: tuple[float, ...]
    confidence: str

    def embed(self, ids: torch.Tensor, pos: int | torch.Tensor = 0) -> torch.Tensor:
        """Token ids (B, T) at positions pos..pos+T-1 -> the input of layer 1, (B, T, C).

        `pos` matters to backbones with learned absolute positions (GPT-2); rotary ones apply it in `layer`. A (B,)
        long `pos` gives each row its own start (rows of a cache with per-row lengths).
        """
        ...

    def layer(
        self,
        i: int,
        h: torch.Tensor,
        pos: int = 0,
        cache: Any = None,
        active: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run layer i on h (B, T, C), the tokens at positions pos..pos+T-1 -> (B, T, C).

        With `cache` (from `new_cache`), attend over the positions that layer i's cache holds and append this
        call's keys and values. After `crop_cache` with per-row lengths n_b, the cache's slot t is position t:
        row b's T tokens are written at slots n_b..n_b+T-1 (overwriting stale K/V there), its query t attends
        slots 0..n_b+t of its own row only, and n_b grows by T; pass `positions` = n_b + (0..T-1) (rotary ones
        read them; `pos` is ignored). With `active` (B, T) bool, only active tokens are updated; the others keep
        their input state and only provide keys and values (CALM state propagation). A backbone may compute
        the inactive tokens fully and discard their outputs, at no change in the result. With `positions`
        (B, T) long, ascending in each row, the tokens sit at those positions instead (Mixture-of-Depths runs a
        layer on a gathered sub-sequence): rotary backbones rotate by them, attention stays causal in h's order
        (over the cache first, if any), and `pos` is not used.
        """
        ...

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """The shared exit: final norm, then the output head. (..., C) -> (..., V)."""
        ...

    def new_cache(self, batch_size: int, max_len: int) -> Any:
        """An empty KV cache for every layer, for `layer(..., cache=)`."""
        ...

    def crop_cache(self, cache: Any, length: int | torch.Tensor) -> None:
        """Keep only positions 0..length-1 in every layer of `cache` (self-speculative decoding drops the K/V of
        rejected draft tokens). A (B,) long `length` gives row b its own length n_b = length[b] (at most what it
        holds): slots from n_b on are stale, and `layer` calls rewrite them before any query can attend them (see
        `layer`). Rows of equal lengths (or an int) are the plain cache again; an int must not exceed any row's
        length. A backbone whose layers cannot hold per-row lengths (sliding-window caches) raises one line."""
        ...

    def param_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """("embedding", ...), ("layer_1", ...) .. ("layer_L", ...), ("head", shared final norm + output head)."""
        ...

    def extended(self, num_layers: int) -> "Backbone":
        """A deeper copy: layers 1..L, embedding and head copied, layers L+1..num_layers freshly initialised."""
        ...

    def set_routing(self, exit_layer: int | Sequence[int], routing_threshold: float | Sequence[float]) -> None:
        """Change the inference routing without touching the weights."""
        ...

    def config_dict(self) -> dict[str, Any]:
        """Plain data that rebuilds the architecture (`ease.checkpoint.model_from_args`), stored in checkpoints."""
        ...


def check_layers(model: Backbone, layers: Sequence[int]) -> None:
    """One-line ValueError unless every layer is in 1..L."""
    if not layers:
        raise ValueError("exit_layers: at least one layer is required")
    bad = [layer for layer in layers if not 1 <= layer <= model.num_layers]
    if bad:
        raise ValueError(f"exit_layers: layers must be in 1..{model.num_layers}, got {bad}")


def run_layers(model: Backbone, h: torch.Tensor, start: int, end: int, pos: int = 0) -> torch.Tensor:
    """Apply layers start+1..end to the hidden state after layer `start`. (B, T, C) -> (B, T, C)."""
    for i in range(start + 1, end + 1):
        h = model.layer(i, h, pos)
    return h


# Runs layer i on h (B, T, C) in place of `model.layer(i, h)`: training's layer dropout (ease.model.layer_dropout).
LayerFn = Callable[[int, torch.Tensor], torch.Tensor]


def hidden_states(
    model: Backbone, x: torch.Tensor, layers: Iterable[int], layer_fn: LayerFn | None = None
) -> dict[int, torch.Tensor]:
    """{layer: hidden state (B, T, C)} after each requested layer; no layer past the deepest one runs.

    `layer_fn(i, h)`, when given, runs each layer instead of `model.layer(i, h)`."""
    wanted = sorted(set(layers))
    check_layers(model, wanted)
    run = model.layer if layer_fn is None else layer_fn
    h = model.embed(x)  # (B, T, C)
    out: dict[int, torch.Tensor] = {}
    for i in range(1, wanted[-1] + 1):
        h = run(i, h)
        if i in wanted:
            out[i] = h
    return out


def exit_logits(model: Backbone, x: torch.Tensor, layers: Iterable[int]) -> dict[int, torch.Tensor]:
    """{layer: logits (B, T, V)} for exactly the requested layers: the head runs only there."""
    return {layer: model.unembed(h) for layer, h in hidden_states(model, x, layers).items()}


def exit_states(model: Backbone, x: torch.Tensor, layers: Iterable[int], extra: Iterable[int] = ()) -> dict:
    """{layer: hidden state (B, T, C)} after each of `layers` and `extra`; 0 is the embedding (layer 1's input),
    so a hidden-state measure at exit e can read the states after e and e-1."""
    wanted = {*layers, *extra}
    h = model.embed(x)  # (B, T, C)
    out = {0: h} if 0 in wanted else {}
    for i in range(1, max(wanted) + 1):
        h = model.layer(i, h)
        if i in wanted:
            out[i] = h
    return out


@torch.no_grad()
def routed_forward(
    model: Backbone,
    x: torch.Tensor,
    exit_layer: int | Sequence[int] | None = None,
    routing_threshold: float | Sequence[float] | None = None,
) -> RoutedOutput:
    """Confidence routing, counted mode: run every layer, then score each token at its exit.

    A token exits at the first routing exit whose confidence reaches that exit's threshold (a cascade when
    several exits are given); otherwise at the last layer. Routing defaults to the model's own.
    """
    L = model.num_layers
    if exit_layer is None:
        exits, thresholds = model.exit_layers, model.routing_thresholds
    else:
        exits, thresholds = normalize_routing(exit_layer, routing_threshold or 0.0, L)
    active = [e for e, t in zip(exits, thresholds) if t > 0]
    if active and needs_hidden(model.confidence):  # saturation / classifier read the states at e and e-1
        states = exit_states(model, x, [*active, L], [e - 1 for e in active])
        logits = {layer: model.unembed(states[layer]) for layer in [*active, L]}
        confs = {e: measure_confidence(model, model.confidence, e, logits[e], states[e], states[e - 1]) for e in active}
        exit_at = route_from_confidences(confs, dict(zip(exits, thresholds)), L)
    elif active:
        logits = exit_logits(model, x, [*active, L])
        exit_at = route_by_confidence({e: logits[e] for e in active}, dict(zip(exits, thresholds)), L, model.confidence)
    else:
        logits = exit_logits(model, x, [L])
        exit_at = torch.full(x.shape, L, dtype=torch.long, device=x.device)
    out = logits[L].clone()
    for e in active:
        chosen = exit_at == e  # (B, T)
        out[chosen] = logits[e][chosen]
    return RoutedOutput(out, exit_at)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class BackboneMethods:
    """The seeds' model API, written once over the protocol for every backbone that mixes it in."""

    num_layers: int
    exit_layers: tuple[int, ...]
    routing_thresholds: tuple[float, ...]

    @property
    def exit_layer(self) -> int:
        """The first (shallowest) routing exit, the seeds' single `exit_layer`."""
        return self.exit_layers[0]

    @property
    def routing_threshold(self) -> float:
        return self.routing_thresholds[0]

    def set_routing(self, exit_layer: int | Sequence[int], routing_threshold: float | Sequence[float]) -> None:
        """Change the inference routing without touching the weights."""
        self.exit_layers, self.routing_thresholds = normalize_routing(exit_layer, routing_threshold, self.num_layers)

    def hidden_states(self, x: torch.Tensor, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """Hidden states (before the shared norm) after each requested layer; stops at the deepest one."""
        return hidden_states(self, x, layers)  # type: ignore[arg-type]

    def forward(
        self, x: torch.Tensor, exit_layers: Iterable[int] | None = None
    ) -> torch.Tensor | dict[int, torch.Tensor]:
        """x: (B, T) token ids.

        Without `exit_layers`, returns the last layer's logits (B, T, V), like any LM. With them, returns
        {layer: logits (B, T, V)} for exactly those layers, computing no layer past the deepest one.
        """
        if exit_layers is None:
            return exit_logits(self, x, [self.num_layers])[self.num_layers]  # type: ignore[arg-type]
        return exit_logits(self, x, exit_layers)  # type: ignore[arg-type]

    def forward_all_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's logits, shallowest first: [(B, T, V)] * num_layers (seed 003)."""
        logits = self.forward(x, range(1, self.num_layers + 1))
        return [logits[layer] for layer in range(1, self.num_layers + 1)]

    def routed_forward(
        self,
        x: torch.Tensor,
        exit_layer: int | Sequence[int] | None = None,
        routing_threshold: float | Sequence[float] | None = None,
    ) -> RoutedOutput:
        """Confidence routing, counted mode (`routed_forward`); routing defaults to the model's."""
        return routed_forward(self, x, exit_layer, routing_threshold)  # type: ignore[arg-type]

    def num_parameters(self) -> int:
        return num_parameters(self)  # type: ignore[arg-type]
