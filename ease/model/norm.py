"""Root-mean-square layer norm (Zhang & Sennrich, 2019)."""

import torch
from torch import nn


class _RMSNormFunction(torch.autograd.Function):
    """y = x̂ · w, x̂ = x · r, r = 1 / sqrt(mean(x²) + eps), in float32; autograd's own gradient, written out.

    The forward is the plain formula; the backward computes autograd's gradient of it with the same
    operations on the same values, bit for bit, but in half the passes over (..., C) and two allocations
    instead of nine (autograd keeps a tensor per node: the expanded mean gradient, x.pow(1), 2·x, ...). On
    CPU that halves the norm's cost, and `F.rms_norm` gains nothing there: it decomposes into the same
    operations as the plain formula.

        dw = Σ g · x̂                    dx = (g·w) · r + x · 2t,  t = -0.5 · Σ_c(g·w · x) · r³ / C

    x comes in twice, so that its two terms reach x's gradient as autograd's do: one by one, added to the
    residual branch's gradient in the same order ((residual + (g·w)·r) + x·2t, not residual + the sum).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_again: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()  # normalise in float32 so half-precision inputs keep a stable RMS
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        xhat = xf * rstd  # (..., C)
        ctx.save_for_backward(xf, rstd, xhat, weight)
        ctx.dtype = x.dtype
        return xhat.type_as(x) * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xf, rstd, xhat, weight = ctx.saved_tensors
        grad_x = grad_x_again = grad_w = None
        if ctx.needs_input_grad[0]:
            gxh = (grad * weight).to(ctx.dtype).float()  # (..., C): the gradient at x̂, rounded as autograd does
            through_pow = gxh * xf
            t = (through_pow.sum(-1, keepdim=True) * -0.5 * rstd.pow(3)) / xf.shape[-1]  # (..., 1): rsqrt, mean
            torch.mul(xf, 2.0 * t, out=through_pow)  # autograd's t · (2·x): the same product, as 2· is exact
            grad_x = gxh.mul_(rstd)  # through x̂ = x · r
            if ctx.dtype == torch.float32:
                grad_x_again = through_pow
            else:  # x.float() sums both terms in float32 before rounding to x's dtype
                grad_x = grad_x.add_(through_pow).to(ctx.dtype)
        if ctx.needs_input_grad[2]:
            prod = grad * xhat.to(ctx.dtype)
            grad_w = prod.sum(tuple(range(prod.dim() - 1))).to(weight.dtype)
        return grad_x, grad_x_again, grad_w, None


class RMSNorm(nn.Module):
    """Scale by the inverse RMS of the last dimension; no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, x, self.weight, self.eps)


NORMS = ("rms", "layer")  # `model.norm`


def make_norm(kind: str, dim: int) -> nn.Module:
    """`model.norm`: "rms" (RMSNorm, the Llama default) or "layer" (LayerNorm without bias, GPT-2 / nanoGPT's
    `bias=False`; PyTorch's native kernel in both directions)."""
    if kind == "rms":
        return RMSNorm(dim)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=1e-5, bias=False)
    raise ValueError(f"model.norm: must be one of {', '.join(NORMS)}, got {kind!r}")
