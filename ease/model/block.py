"""Pre-norm Transformer block."""

import torch
from torch import nn

from ease.model.attention import CausalSelfAttention, KVCache
from ease.model.ffn import make_ffn
from ease.model.norm import make_norm


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        norm: str = "rms",
        ffn: str = "swiglu",
    ) -> None:
        super().__init__()
        self.attn_norm = make_norm(norm, dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.ffn_norm = make_norm(norm, dim)
        self.ffn = make_ffn(ffn, dim, hidden_dim, dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        cache: KVCache | None = None,
        active: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). With `active` (B, T) bool, only active tokens are updated: the others
        keep their state (an exited token's) and only provide keys and values to the active ones."""
        if active is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, cache)
            return x + self.ffn(self.ffn_norm(x))
        B, T, C = x.shape
        flat, y = self.attn.forward_active(self.attn_norm(x), cos, sin, active, cache)  # (Na,), (Na, C)
        if flat.numel() == 0:
            return x
        h = x.reshape(B * T, C)[flat] + y  # (Na, C)
        h = h + self.ffn(self.ffn_norm(h))
        out = x.clone()
        out.view(B * T, C)[flat] = h
        return out
