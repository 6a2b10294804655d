"""Mixture-of-Depths (Raposo et al. 2024): each routed block processes only the top share of a sequence's tokens.

`MixtureOfDepths` wraps any backbone (the native model or a Hugging Face one) and is itself a backbone. A routed
layer i has a router, a linear scorer r = w·x (C -> 1). In training, the tokens with the top k = max(1,
floor(capacity·T)) scores of each sequence run the block, gathered into a sub-sequence in their original order
and at their original positions (RoPE, causal order: `Backbone.layer(..., positions=)`), so they attend only
among themselves; the other tokens skip the block through the residual, unchanged. A processed token's update
is scaled by its router weight, the paper's x + r·(f(x) - x) with the raw score r (`weight="raw"`; `"sigmoid"`
uses σ(r) instead), which is how the router gets gradients.

Top-k over the sequence looks ahead (a token's selection depends on later tokens). The paper's causal
predictor, a small MLP on the block input with the gradient stopped, is trained alongside with a binary
cross-entropy to predict whether a token is in the top k; `auxiliary_loss()` returns that term (times
`aux_weight`) for the trainer to add. With `inference="predictor"` evaluation routes a token through a block
when the predictor says so (logit > 0), token by token without looking ahead; decoding through a KV cache always
routes this way. A routed layer's cache holds the keys and values of its processed tokens only (each row its
own cache, as rows process different tokens), so decoding reproduces the predictor's full forward.

In evaluation mode the wrapper counts the token-layer computations it runs (`counts`, `compute_cost`); the
padding a batch of rows with different predictor counts needs is not counted.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ease.model.backbone import Backbone, BackboneMethods

INFERENCE = ("topk", "predictor")
WEIGHTS = ("raw", "sigmoid")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_capacity_range(value: Any) -> bool:
    return _is_number(value) and 0.0 < float(value) <= 1.0


@dataclass
class MoDConfig:
    """The `mod` group: Mixture-of-Depths routing (off while `capacity` is null).

    Attributes:
        capacity: null = off; a float in (0, 1]: the share of each sequence's tokens every routed block
            processes; or a list with one entry per layer (1 = that block runs on every token, unrouted).
        every: with a float capacity, route layers every, 2·every, ... (the paper routes every other block).
        aux_weight: weight of the causal predictor's BCE term in the training loss (its input is detached, so
            it trains the predictor only).
        inference: evaluation routing: topk (the training routing, looks ahead) or predictor (causal).
        weight: what scales a processed token's update: raw (the router score r, as in the paper) or sigmoid.
    """

    capacity: Any = None
    every: int = 2
    aux_weight: float = 1.0
    inference: str = "topk"
    weight: str = "raw"

    def __post_init__(self) -> None:
        c = self.capacity
        if c is not None:
            if isinstance(c, (list, tuple)) or hasattr(c, "__len__"):
                c = list(c)
                if not c or not all(_in_capacity_range(v) for v in c):
                    raise ValueError(f"mod.capacity: every entry must be in (0, 1], got {c}")
                self.capacity = [float(v) for v in c]
            elif not _in_capacity_range(c):
                raise ValueError(f"mod.capacity: must be in (0, 1] (or a list, one per layer, or null), got {c!r}")
            else:
                self.capacity = float(c)
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"mod.every: must be an int >= 1, got {self.every!r}")
        if not (_is_number(self.aux_weight) and math.isfinite(self.aux_weight) and self.aux_weight >= 0):
            raise ValueError(f"mod.aux_weight: must be a finite number >= 0, got {self.aux_weight!r}")
        if self.inference not in INFERENCE:
            raise ValueError(f"mod.inference: must be one of {', '.join(INFERENCE)}, got {self.inference!r}")
        if self.weight not in WEIGHTS:
            raise ValueError(f"mod.weight: must be one of {', '.join(WEIGHTS)}, got {self.weight!r}")

    @property
    def enabled(self) -> bool:
        return self.capacity is not None

    def capacities(self, num_layers: int) -> list[float | None]:
        """One entry per layer: the routed capacity, or None for a block that runs on every token."""
        if isinstance(self.capacity, list):
            if len(self.capacity) != num_layers:
                raise ValueError(
                    f"mod.capacity: needs one entry per layer ({num_layers}), got {len(self.capacity)}: {self.capacity}"
                )
            return [None if c == 1.0 else c for c in self.capacity]
        out = [self.capacity if i % self.every == 0 else None for i in range(1, num_layers + 1)]
        if all(c is None for c in out):
            raise ValueError(f"mod.every: routes no layer of the model's {num_layers}, got {self.every}")
        return out


def capacity_tokens(capacity: float, length: int) -> int:
    """k = max(1, floor(capacity·T)): the tokens a routed block processes in a sequence of T."""
    return max(1, math.floor(capacity * length + 1e-9))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T) scores -> (B, T) bool, True at each row's k highest scores."""
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


class Predictor(nn.Module):
    """The causal routing predictor: a small MLP on one token's block input -> a logit (in the top k or not)."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or max(8, dim // 8)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)  # (..., C) -> (...)


@dataclass
class MoDCache:
    """The inner backbone's cache for unrouted layers (`shared`) and one per row for routed layers (`rows`):
    rows process different tokens, so a routed layer's K/V differ in length from row to row."""

    shared: Any
    rows: list[Any]


def _inner_attribute(name: str) -> property:
    """An attribute the wrapper reads from and writes to its inner backbone (the routing exits live there)."""
    return property(lambda self: getattr(self.inner, name), lambda self, value: setattr(self.inner, name, value))


class MixtureOfDepths(BackboneMethods, nn.Module):
    """A backbone whose routed blocks process only some tokens (see the module docstring).

    Args:
        backbone: the inner backbone (native or Hugging Face); its layers, embedding and head are used as they are.
        capacity: one entry per layer: the routed capacity in (0, 1], or None for an unrouted block.
        aux_weight: weight of the predictor's BCE in `auxiliary_loss`.
        inference: evaluation routing, "topk" or "predictor" (decoding with a cache always uses the predictor).
        weight: "raw" (x + r·(f(x) - x), the paper) or "sigmoid" (σ(r) instead of r).
    """

    def __init__(
        self,
        backbone: Backbone,
        capacity: Sequence[float | None],
        aux_weight: float = 1.0,
        inference: str = "topk",
        weight: str = "raw",
    ) -> None:
        super().__init__()
        if len(capacity) != backbone.num_layers:
            raise ValueError(f"mod.capacity: needs one entry per layer ({backbone.num_layers}), got {list(capacity)}")
        if any(c is not None and not _in_capacity_range(c) for c in capacity):
            raise ValueError(f"mod.capacity: every entry must be in (0, 1], got {list(capacity)}")
        if all(c is None for c in capacity):
            raise ValueError("mod.capacity: no layer is routed")
        if inference not in INFERENCE:
            raise ValueError(f"mod.inference: must be one of {', '.join(INFERENCE)}, got {inference!r}")
        if weight not in WEIGHTS:
            raise ValueError(f"mod.weight: must be one of {', '.join(WEIGHTS)}, got {weight!r}")
        self.inner = backbone
        self.capacity = tuple(None if c is None else float(c) for c in capacity)
        self.aux_weight = float(aux_weight)
        self.inference = inference
        self.weight = weight
        self.num_layers = backbone.num_layers
        self.vocab_size = backbone.vocab_size
        self.dim = int(backbone.dim)
        routed = [i for i, c in enumerate(self.capacity, start=1) if c is not None]
        self.routers = nn.ModuleDict({str(i): nn.Linear(self.dim, 1, bias=False) for i in routed})
        self.predictors = nn.ModuleDict({str(i): Predictor(self.dim) for i in routed})
        self._aux: list[torch.Tensor] = []
        self.counts = [0, 0]  # [token-layer computations run, token-layers seen], counted in eval mode

    # --- routing settings and the inner model's attributes ---------------------------------------------------

    @property
    def routed_layers(self) -> list[int]:
        return [i for i, c in enumerate(self.capacity, start=1) if c is not None]

    exit_layers = _inner_attribute("exit_layers")  # tuple[int, ...]
    routing_thresholds = _inner_attribute("routing_thresholds")  # tuple[float, ...]

    @property
    def confidence(self) -> str:
        return self.inner.confidence

    @property
    def layers(self) -> nn.ModuleList:
        """The inner backbone's blocks (compile and data-parallel wrapping act on them)."""
        return self.inner.layers

    @property
    def max_positions(self) -> int | None:
        return getattr(self.inner, "max_positions", None)

    # --- the backbone protocol ------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor, pos: int = 0) -> torch.Tensor:
        self._aux = []  # a new forward pass: the predictor terms of the previous one are gone
        return self.inner.embed(ids, pos)

    def layer(
        self,
        i: int,
        h: torch.Tensor,
        pos: int = 0,
        cache: MoDCache | None = None,
        active: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layer i on h (B, T, C); a routed layer runs its block on the chosen tokens only."""
        B, T, _ = h.shape
        capacity = self.capacity[i - 1]
        if capacity is None:
            if not self.training:
                self.counts[0] += B * T
                self.counts[1] += B * T
            return self.inner.layer(i, h, pos, None if cache is None else cache.shared, active, positions)
        if positions is None:
            positions = torch.arange(pos, pos + T, device=h.device).expand(B, T)
        scores = self.routers[str(i)](h).squeeze(-1)  # (B, T)
        predictor = self.predictors[str(i)]
        k = capacity_tokens(capacity, T)
        if self.training:
            chosen = top_k_mask(scores.detach(), k)
            # The auxiliary predictor learns to tell the top k from the block input alone (gradient stopped).
            self._aux.append(F.binary_cross_entropy_with_logits(predictor(h.detach()), chosen.float()))
        elif cache is not None or self.inference == "predictor":
            chosen = predictor(h) > 0  # causal: each token decides on its own state
        else:
            chosen = top_k_mask(scores, k)
        if not self.training:
            self.counts[0] += int(chosen.sum())
            self.counts[1] += B * T
        w = scores if self.weight == "raw" else torch.sigmoid(scores)
        if cache is not None:
            return self._cached(i, h, chosen, w, positions, cache, active)
        return self._gathered(i, h, chosen, w, positions, active)

    def _gathered(
        self,
        i: int,
        h: torch.Tensor,
        chosen: torch.Tensor,
        w: torch.Tensor,
        positions: torch.Tensor,
        active: torch.Tensor | None,
    ) -> torch.Tensor:
        """Run block i on each row's chosen tokens (a sub-sequence in their order, at their positions)."""
        B, _, C = h.shape
        counts = chosen.sum(1)
        n = int(counts.max())
        if n == 0:
            return h
        # Each row's chosen tokens first, in order; rows with fewer are padded with unchosen tokens, which come
        # after every chosen one (causal attention never lets a chosen token see them) and are discarded.
        order = torch.sort((~chosen).to(torch.uint8), dim=1, stable=True).indices[:, :n]  # (B, n)
        valid = torch.arange(n, device=h.device) < counts[:, None]  # (B, n)
        index = order[..., None].expand(B, n, C)
        sub = h.gather(1, index)  # (B, n, C)
        out = self.inner.layer(i, sub, positions=positions.gather(1, order))
        if active is not None:
            out = torch.where(active.gather(1, order)[..., None], out, sub)
        update = (out - sub) * (w.gather(1, order) * valid)[..., None]  # (B, n, C); zero on the padding
        return h.scatter_add(1, index, update)

    def _cached(
        self,
        i: int,
        h: torch.Tensor,
        chosen: torch.Tensor,
        w: torch.Tensor,
        positions: torch.Tensor,
        cache: MoDCache,
        active: torch.Tensor | None,
    ) -> torch.Tensor:
        """Decoding: each row's chosen tokens run block i with that row's cache (only they add K/V)."""
        out = h.clone()
        for b in range(h.shape[0]):
            idx = chosen[b].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            sub = h[b : b + 1, idx]  # (1, n, C)
            y = self.inner.layer(i, sub, cache=cache.rows[b], positions=positions[b : b + 1, idx])
            if active is not None:
                y = torch.where(active[b : b + 1, idx, None], y, sub)
            out[b, idx] = sub[0] + w[b, idx, None] * (y[0] - sub[0])
        return out

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner.unembed(h)

    def new_cache(self, batch_size: int, max_len: int) -> MoDCache:
        rows = [self.inner.new_cache(1, max_len) for _ in range(batch_size)]
        return MoDCache(self.inner.new_cache(batch_size, max_len), rows)

    def crop_cache(self, cache: MoDCache, length: int) -> None:
        raise ValueError("task.mode: self-speculative decoding does not support Mixture-of-Depths models")

    def param_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """The inner groups; a routed layer's router and predictor belong to its `layer_i` group."""
        groups = []
        for name, params in self.inner.param_groups():
            if name.startswith("layer_") and name.removeprefix("layer_") in self.routers:
                i = name.removeprefix("layer_")
                params = [*params, *self.routers[i].parameters(), *self.predictors[i].parameters()]
            groups.append((name, params))
        return groups

    def extended(self, num_layers: int) -> "MixtureOfDepths":
        raise ValueError("strategy: ASHEM's growth (extended) does not support Mixture-of-Depths models")

    def config_dict(self) -> dict[str, Any]:
        """The inner backbone's arguments plus a `mod` entry (`ease.checkpoint.model_from_args` rebuilds both)."""
        mod = {"capacity": list(self.capacity), "aux_weight": self.aux_weight, "inference": self.inference,
               "weight": self.weight}  # fmt: skip
        return {**self.inner.config_dict(), "mod": mod}

    # --- what training and the record use -------------------------------------------------------------

    def auxiliary_loss(self) -> torch.Tensor | None:
        """aux_weight × the mean predictor BCE over the routed layers of the last training forward (None if none)."""
        if not self._aux:
            return None
        return self.aux_weight * torch.stack(self._aux).mean()

    def reset_counts(self) -> None:
        self.counts = [0, 0]

    @property
    def compute_cost(self) -> float:
        """Share of the token-layer computations run since `reset_counts` (eval mode), 1 = every block on every
        token."""
        return self.counts[0] / self.counts[1] if self.counts[1] else float("nan")


# Seed 000's name for the method's model.
MoDTransformer = MixtureOfDepths


def build_mod(backbone: Backbone, config: MoDConfig) -> Backbone:
    """The backbone wrapped as `config` says (the backbone itself while config.capacity is null)."""
    if not config.enabled:
        return backbone
    return MixtureOfDepths(
        backbone, config.capacities(backbone.num_layers), config.aux_weight, config.inference, config.weight
    )


@torch.no_grad()
def mod_metrics(model: MixtureOfDepths, batches: Iterable[Any]) -> dict[str, Any]:
    """Perplexity and counted compute cost under both inference routings (top-k and the causal predictor), and
    how often the predictor agrees with top-k on the top-k routing's own states. Restores the model's mode."""
    was_training, inference = model.training, model.inference
    device = next(model.parameters()).device
    model.eval()
    out: dict[str, Any] = {
        "capacity": list(model.capacity),
        "routed_layers": model.routed_layers,
        "inference": inference,
        "weight": model.weight,
        "aux_weight": model.aux_weight,
    }
    try:
        for mode in INFERENCE:
            model.inference = mode
            model.reset_counts()
            nll, tokens = 0.0, 0
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                logits = model(x)
                nll += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
                tokens += y.numel()
            out[f"ppl_{mode}"] = math.exp(nll / tokens) if tokens else float("nan")
            out[f"compute_cost_{mode}"] = model.compute_cost
        out["compute_cost"] = out[f"compute_cost_{inference}"]
        out["predictor_agreement"] = predictor_agreement(model, batches)
    finally:
        model.inference = inference
        model.reset_counts()
        model.train(was_training)
    return out


@torch.no_grad()
def predictor_agreement(model: MixtureOfDepths, batches: Iterable[Any]) -> float:
    """Share of (token, routed layer) decisions where predictor > 0 equals top-k membership (top-k routing)."""
    agree, total = 0, 0
    model.inference = "topk"
    device = next(model.parameters()).device
    for x, _ in batches:
        h = model.embed(x.to(device))
        for i in range(1, model.num_layers + 1):
            c = model.capacity[i - 1]
            if c is not None:
                chosen = top_k_mask(model.routers[str(i)](h).squeeze(-1), capacity_tokens(c, h.shape[1]))
                agree += int(((model.predictors[str(i)](h) > 0) == chosen).sum())
                total += chosen.numel()
            h = model.layer(i, h)
    return agree / total if total else float("nan")
