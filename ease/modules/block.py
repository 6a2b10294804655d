"""Pre-norm Transformer block."""

import torch
from torch import nn

from ease.modules.attention import CausalSelfAttention, KVCache
from ease.modules.ffn import SwiGLU
from ease.modules.norm import RMSNorm


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, dim: int, num_heads: int, hidden_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.ffn_norm = RMSNorm(dim)
        self.ffn = SwiGLU(dim, hidden_dim, dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        x = x + self.ffn(self.ffn_norm(x))
        return x
