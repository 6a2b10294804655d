"""The native early-exit language model: embedding, N pre-norm blocks, one shared norm + head for every exit.

Every exit layer l produces logits with the same `unembed` (final norm, then the output head), as in
LayerSkip. The default architecture is Llama's (RMSNorm, rotary positions, SwiGLU); `norm`, `positions` and
`ffn` switch each part to GPT-2's (LayerNorm, learned positions, 4×GELU MLP). `forward` computes only what
it is asked for: the blocks up to the deepest requested exit, and the head only at the requested exits. A
standard LM therefore pays for one head, and deep supervision pays for exactly the heads whose loss weight
is non-zero.

It implements `ease.model.backbone.Backbone`; everything else in EASE uses it only through that protocol.
Layers are 1-indexed everywhere in EASE: layer 1 is the first block, layer `num_layers` the last.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ease.model.attention import KVCache, RotaryEmbedding
from ease.model.backbone import BackboneMethods
from ease.model.block import TransformerBlock
from ease.model.norm import make_norm
from ease.model.row_cache import row_lengths
from ease.routing import normalize_routing

POSITIONS = ("rotary", "learned")  # `model.positions`


class EarlyExitTransformer(BackboneMethods, nn.Module):
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
        norm: str = "rms",
        positions: str = "rotary",
        ffn: str = "swiglu",
        max_positions: int = 1024,
    ) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"model.positions: must be one of {', '.join(POSITIONS)}, got {positions!r}")
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
        self.norm_kind, self.positions, self.ffn_kind, self.table_len = norm, positions, ffn, max_positions

        self.embedding = nn.Embedding(vocab_size, dim)
        # Learned positions (GPT-2): one table row added to each token's embedding; rotary: none here.
        self.pos_embedding = nn.Embedding(max_positions, dim) if positions == "learned" else None
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, num_heads, hidden_dim, dropout, norm, ffn) for _ in range(num_layers)
        )
        self.rope = RotaryEmbedding(dim // num_heads) if positions == "rotary" else None
        self.norm = make_norm(norm, dim)  # shared by every exit
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

    # --- the backbone protocol --------------------------------------------------------------------------

    @property
    def llama_style(self) -> bool:
        """The default architecture (RMSNorm, RoPE, SwiGLU): what `FusedDecoder` is written for."""
        return (self.norm_kind, self.positions, self.ffn_kind) == ("rms", "rotary", "swiglu")

    @property
    def max_positions(self) -> int | None:
        """The most positions the model holds: the learned table's length; None with RoPE (no limit)."""
        return self.table_len if self.pos_embedding is not None else None

    def embed(self, x: torch.Tensor, pos: int | torch.Tensor = 0) -> torch.Tensor:
        h = self.embedding(x)  # (B, T, C)
        if self.pos_embedding is not None:  # learned positions pos..pos+T-1; RoPE applies them in `layer`
            T = x.shape[1]
            if isinstance(pos, int):
                end, table = pos + T, self.pos_embedding.weight[pos : pos + T]  # a slice: no gather in training
            else:  # (B,) pos: each row's own start
                end, table = int(pos.max()) + T, self.pos_embedding(pos[:, None] + torch.arange(T, device=x.device))
            if end > self.table_len:
                raise ValueError(f"model.max_positions: learned positions end at {self.table_len}, got {end}")
            h = h + table  # (B, T, C)
        return self.dropout(h)

    def layer(
        self,
        i: int,
        h: torch.Tensor,
        pos: int = 0,
        cache: list[KVCache] | None = None,
        active: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Block i (1-indexed) on h (B, T, C) at positions pos..pos+T-1 (or `positions`); see `Backbone.layer`."""
        if self.rope is None:  # learned positions: already in h since `embed`
            cos = sin = None
        elif positions is not None:  # each token at its own position (a Mixture-of-Depths sub-sequence)
            cos, sin = self.rope.at(positions)  # (B, 1, T, hd/2) each
            if active is not None:  # per-row tables do not fit forward_active's gather: the plain fallback
                out = self.layers[i - 1](h, cos, sin, None if cache is None else cache[i - 1])
                return torch.where(active[..., None], out, h)
        else:
            cos, sin = self.rope(pos, h.shape[1])
        return self.layers[i - 1](h, cos, sin, None if cache is None else cache[i - 1], active)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Shared exit: final norm, then the output head. (..., C) -> (..., V)."""
        return self.output_head(self.norm(h))

    def new_cache(self, batch_size: int, max_len: int) -> list[KVCache]:
        """One growing K/V cache per layer (the batch size and length follow from what is appended)."""
        return [KVCache() for _ in range(self.num_layers)]

    def crop_cache(self, cache: list[KVCache], length: int | torch.Tensor) -> None:
        """Keep positions 0..length-1 of every layer's K/V; a (B,) `length` keeps each row's own count."""
        longest, rows = row_lengths(length)
        for layer in cache:
            layer.crop(longest, rows)

    def param_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        positional = [] if self.pos_embedding is None else list(self.pos_embedding.parameters())
        groups = [("embedding", [*self.embedding.parameters(), *positional])]
        groups += [(f"layer_{i}", list(block.parameters())) for i, block in enumerate(self.layers, start=1)]
        groups.append(("head", [*self.norm.parameters(), *self.output_head.parameters()]))
        return groups

    def extended(self, num_layers: int) -> "EarlyExitTransformer":
        """A deeper copy (ASHEM's growth): embedding, blocks 1..L, norm and head copied from this model; the new
        blocks freshly initialised (residual projections near zero, so they start close to the identity)."""
        if num_layers <= self.num_layers:
            raise ValueError(f"phase2_layers: must be > the model's {self.num_layers} layers, got {num_layers}")
        args = {**self.config_dict(), "num_layers": num_layers, "routing_threshold": 0.0}
        device = next(self.parameters()).device
        deeper = EarlyExitTransformer(**args).to(device)
        deeper.embedding.load_state_dict(self.embedding.state_dict())
        if self.pos_embedding is not None:
            deeper.pos_embedding.load_state_dict(self.pos_embedding.state_dict())
        for i in range(self.num_layers):
            deeper.layers[i].load_state_dict(self.layers[i].state_dict())
        deeper.norm.load_state_dict(self.norm.state_dict())
        deeper.output_head.load_state_dict(self.output_head.state_dict())
        return deeper

    # --- the seeds' API on top of the protocol ------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
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
            "norm": self.norm_kind,
            "positions": self.positions,
            "ffn": self.ffn_kind,
            "max_positions": self.table_len,
        }


def StandardTransformer(  # noqa: N802
    vocab_size: int, dim: int, num_layers: int, num_heads: int = 4, **kwargs: Any
) -> EarlyExitTransformer:
    """The seeds' standard LM: trained on the last layer only (the loss config decides), no routing by default."""
    kwargs.setdefault("routing_threshold", 0.0)
    return EarlyExitTransformer(vocab_size, dim, num_layers, num_heads, **kwargs)


# The seeds' names for the same model: the loss weights and routing settings, not the class, make the method.
DeepSupervisionTransformer = EarlyExitTransformer
DEEDTransformer = EarlyExitTransformer
