"""Feed-forward networks: the gated SwiGLU (Shazeer 2020, the default) and GPT-2's 4×GELU MLP."""

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_dim(dim: int, multiple_of: int = 16) -> int:
    """LLaMA's sizing: 2/3 of 4*dim keeps the parameter count of a plain 4*dim MLP."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class _GatedSiLU(torch.autograd.Function):
    """silu(gate) · up for h = [gate | up] (..., 2H) -> (..., H): autograd's operations in both directions,
    bit for bit, except that the backward writes the two halves' gradients straight into one (..., 2H) buffer
    instead of concatenating them (on CPU a fresh tensor of that size costs about as much as the arithmetic).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)  # (..., H) each
        act = F.silu(gate)
        ctx.save_for_backward(h, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        h, act = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        out = torch.empty(h.shape, dtype=torch.result_type(grad, up), device=grad.device)
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input((grad * up).to(out.dtype), gate, grad_input=d_gate)
        torch.mul(grad, act, out=d_up)
        return out.to(h.dtype)


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
        return self.dropout(self.w2(_GatedSiLU.apply(self.w13(x))))  # W2 (silu(W1 x) · W3 x)


GatedLinearUnit = SwiGLU  # the seeds' name


class GeluMLP(nn.Module):
    """out = W2 gelu(W1 x), hidden 4·dim by default: GPT-2 / nanoGPT's MLP without biases (`model.ffn=gelu`).

    W2 keeps SwiGLU's name, so the residual projections' GPT-2 initialisation finds it (`ffn.w2.weight`).
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        hidden_dim = hidden_dim or 4 * dim
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.gelu(self.w1(x))))


FFNS = ("swiglu", "gelu")  # `model.ffn`


def make_ffn(kind: str, dim: int, hidden_dim: int | None = None, dropout: float = 0.0) -> nn.Module:
    """`model.ffn`: "swiglu" (hidden 2/3·4·dim by default) or "gelu" (hidden 4·dim by default)."""
    if kind == "swiglu":
        return SwiGLU(dim, hidden_dim, dropout)
    if kind == "gelu":
        return GeluMLP(dim, hidden_dim, dropout)
    raise ValueError(f"model.ffn: must be one of {', '.join(FFNS)}, got {kind!r}")
