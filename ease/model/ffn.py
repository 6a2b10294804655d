"""Gated feed-forward network (SwiGLU, Shazeer 2020)."""

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_dim(dim: int, multiple_of: int = 16) -> int:
    """LLaMA's sizing: 2/3 of 4*dim keeps the parameter count of a plain 4*dim MLP."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """out = W2 (silu(W1 x) * W3 x)."""

    def __init__(self, dim: int, hidden_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        hidden_dim = hidden_dim or swiglu_hidden_dim(dim)
        # W1 and W3 fused into one matmul: one kernel launch instead of two.
        self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # (..., hidden) each
        return self.dropout(self.w2(F.silu(gate) * up))


GatedLinearUnit = SwiGLU  # the seeds' name
