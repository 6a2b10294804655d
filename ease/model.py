"""The early-exit language model: embedding, N pre-norm blocks, one shared norm + head for every exit.

Every exit layer l produces logits with the same `unembed` (final RMSNorm, then the output head), as in
LayerSkip. `forward` computes only what it is asked for: the blocks up to the deepest requested exit, and
the head only at the requested exits. A standard LM therefore pays for one head, and deep supervision
pays for exactly the heads whose loss weight is non-zero.

Layers are 1-indexed everywhere in EASE: layer 1 is the first block, layer `num_layers` the last.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ease.modules import RMSNorm, RotaryEmbedding, TransformerBlock
from ease.routing import normalize_routing, route_by_confidence


@dataclass
class RoutedOutput:
    """Per-token routed logits and the layer each token exited at."""

    logits: torch.Tensor  # (B, T, V): each token scored by the logits of its exit layer
    exit_layer: torch.Tensor  # (B, T) long, in 1..num_layers


class EarlyExitTransformer(nn.Module):
    """Decoder-only Transformer whose every layer can be an exit."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        num_layers: int,
        num_heads: int = 4,
        exit_layer: int | Sequence[int] = 1,
        routing_threshold: float | Sequence[float] = 0.0,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        tie_weights: bool = False,
        confidence: str = "max_prob",
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"model.vocab_size: must be >= 2, got {vocab_size}")
        if dim < 1 or num_layers < 1 or num_heads < 1:
            raise ValueError(f"model: dim, num_layers and num_heads must be >= 1, got {dim}, {num_layers}, {num_heads}")
        self.vocab_size = vocab_size
        self.dim = dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.tie_weights = tie_weights
        self.exit_layers, self.routing_thresholds = normalize_routing(exit_layer, routing_threshold, num_layers)
        self.confidence = confidence

        self.embedding = nn.Embedding(vocab_size, dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(TransformerBlock(dim, num_heads, hidden_dim, dropout) for _ in range(num_layers))
        self.rope = RotaryEmbedding(dim // num_heads)
        self.norm = RMSNorm(dim)  # shared by every exit
        self.output_head = nn.Linear(dim, vocab_size, bias=False)
        if tie_weights:
            self.output_head.weight = self.embedding.weight
        self.apply(self._init_weights)
        # GPT-2: shrink the residual projections so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * num_layers) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # --- the pieces -------------------------------------------------------------------------------------

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

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embedding(x))  # (B, T, C)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Shared exit: final norm, then the output head. (..., C) -> (..., V)."""
        return self.output_head(self.norm(h))

    def run_layers(self, h: torch.Tensor, start: int, end: int, pos: int = 0) -> torch.Tensor:
        """Apply layers start+1..end (1-indexed) to the hidden state after layer `start`. (B, T, C) -> (B, T, C)."""
        cos, sin = self.rope(pos, h.shape[1])
        for block in self.layers[start:end]:
            h = block(h, cos, sin)
        return h

    def hidden_states(self, x: torch.Tensor, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """Hidden states (before the shared norm) after each requested layer; stops at the deepest one."""
        wanted = sorted(set(layers))
        self._check_layers(wanted)
        h = self.embed(x)  # (B, T, C)
        cos, sin = self.rope(0, x.shape[1])
        out: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.layers[: wanted[-1]], start=1):
            h = block(h, cos, sin)
            if i in wanted:
                out[i] = h
        return out

    def _check_layers(self, layers: Sequence[int]) -> None:
        if not layers:
            raise ValueError("exit_layers: at least one layer is required")
        bad = [layer for layer in layers if not 1 <= layer <= self.num_layers]
        if bad:
            raise ValueError(f"exit_layers: layers must be in 1..{self.num_layers}, got {bad}")

    # --- forward passes ---------------------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, exit_layers: Iterable[int] | None = None
    ) -> torch.Tensor | dict[int, torch.Tensor]:
        """x: (B, T) token ids.

        Without `exit_layers`, returns the last layer's logits (B, T, V), like any LM. With them, returns
        {layer: logits (B, T, V)} for exactly those layers, computing no block past the deepest one.
        """
        if exit_layers is None:
            return self.unembed(self.hidden_states(x, [self.num_layers])[self.num_layers])
        return {layer: self.unembed(h) for layer, h in self.hidden_states(x, exit_layers).items()}

    def forward_all_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's logits, shallowest first: [(B, T, V)] * num_layers (seed 003)."""
        logits = self(x, range(1, self.num_layers + 1))
        return [logits[layer] for layer in range(1, self.num_layers + 1)]

    @torch.no_grad()
    def routed_forward(
        self,
        x: torch.Tensor,
        exit_layer: int | Sequence[int] | None = None,
        routing_threshold: float | Sequence[float] | None = None,
    ) -> RoutedOutput:
        """Confidence routing, counted mode: run every layer, then score each token at its exit.

        A token exits at the first routing exit whose confidence reaches that exit's threshold
        (a cascade when several exits are given); otherwise at the last layer.
        """
        exits, thresholds = (
            (self.exit_layers, self.routing_thresholds)
            if exit_layer is None
            else normalize_routing(exit_layer, routing_threshold or 0.0, self.num_layers)
        )
        active = [e for e, t in zip(exits, thresholds) if t > 0]
        logits = self(x, [*active, self.num_layers])
        if active:
            exit_at = route_by_confidence(
                {e: logits[e] for e in active}, dict(zip(exits, thresholds)), self.num_layers, self.confidence
            )
        else:
            exit_at = torch.full(x.shape, self.num_layers, dtype=torch.long, device=x.device)
        out = logits[self.num_layers].clone()
        for e in active:
            chosen = exit_at == e  # (B, T)
            out[chosen] = logits[e][chosen]
        return RoutedOutput(out, exit_at)

    def config_dict(self) -> dict:
        """Constructor arguments that rebuild this architecture (stored in checkpoints)."""
        return {
            "vocab_size": self.vocab_size,
            "dim": self.dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "exit_layer": list(self.exit_layers),
            "routing_threshold": list(self.routing_thresholds),
            "hidden_dim": self.hidden_dim,
            "dropout": self.dropout.p,
            "tie_weights": self.tie_weights,
            "confidence": self.confidence,
        }

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def StandardTransformer(  # noqa: N802
    vocab_size: int, dim: int, num_layers: int, num_heads: int = 4, **kwargs: Any
) -> EarlyExitTransformer:
    """The seeds' standard LM: trained on the last layer only (the loss config decides), no routing by default."""
    kwargs.setdefault("routing_threshold", 0.0)
    return EarlyExitTransformer(vocab_size, dim, num_layers, num_heads, **kwargs)


# The seeds' names for the same model: the loss weights and routing settings, not the class, make the method.
DeepSupervisionTransformer = EarlyExitTransformer
DEEDTransformer = EarlyExitTransformer
