"""Root-mean-square layer norm (Zhang & Sennrich, 2019)."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Scale by the inverse RMS of the last dimension; no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so half-precision inputs keep a stable RMS.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight
