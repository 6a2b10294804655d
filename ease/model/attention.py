"""Causal multi-head self-attention with rotary position embeddings (RoPE, Su et al. 2021) and a KV cache.

Besides the plain forward, attention can run queries for a subset of the tokens only (`active`): every token
still provides keys and values to the others, but only active tokens attend. That is what early exit needs:
a token that stopped at a shallower layer stays visible to later tokens (its K/V are projected from its
frozen exit state, CALM's propagation) while no attention or FFN is computed for it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE, grown on demand so any sequence length works."""

    def __init__(self, head_dim: int, base: float = 10000.0, initial_len: int = 256) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"model.dim / model.num_heads: head dimension must be even for RoPE, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(initial_len)

    def _build(self, length: int) -> None:
        t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)  # (T, hd/2)
        self.register_buffer("cos_table", freqs.cos(), persistent=False)
        self.register_buffer("sin_table", freqs.sin(), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions start..start+length-1, each (length, hd/2)."""
        if start + length > self.cos_table.shape[0]:
            self._build(max(2 * self.cos_table.shape[0], start + length))
        return self.cos_table[start : start + length], self.sin_table[start : start + length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) of the head dimension; x is (B, nh, T, hd), cos/sin (T, hd/2) or broadcastable."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hd/2) each
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


@dataclass
class KVCache:
    """One layer's keys and values so far, each (B, nh, T_past, hd)."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    """Multi-head attention over the past, through `scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model.num_heads: must divide model.dim={dim}, got {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated) and values only: what a skipped layer must still provide to later tokens."""
        dim = self.num_heads * self.head_dim
        kv = F.linear(x, self.qkv.weight[dim:])  # (B, T, 2C)
        k, v = kv.split(dim, dim=-1)
        return apply_rotary(self._heads(k), cos, sin), self._heads(v)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) normalised input at positions past..past+T-1 -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # (B, T, C) each
        q = apply_rotary(self._heads(q), cos, sin)  # (B, nh, T, hd)
        k = apply_rotary(self._heads(k), cos, sin)
        v = self._heads(v)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, past+T, hd)
        dropout_p = self.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # Query i sits at absolute position past+i and may see keys 0..past+i.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)

    def forward_active(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        active: torch.Tensor,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention for the `active` tokens only; every token's K/V is computed (and cached).

        x: (B, T, C) normalised input, active: (B, T) bool. Returns (flat, y): the active tokens' indices
        into the flattened (B*T) positions, row by row, and their attention outputs (Na, C).
        """
        B, T, C = x.shape
        nh, hd = self.num_heads, self.head_dim
        k, v = self.project_kv(x, cos, sin)  # (B, nh, T, hd): every position, as later tokens attend to all
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, past+T, hd)
        # Each row's active positions first, in order, padded to the longest row: (B, Tq).
        counts = active.sum(1)
        Tq = int(counts.max()) if counts.numel() else 0
        order = torch.sort((~active).to(torch.uint8), dim=1, stable=True).indices[:, :Tq]
        valid = torch.arange(Tq, device=x.device) < counts[:, None]  # (B, Tq)
        flat = (order + torch.arange(B, device=x.device)[:, None] * T)[valid]  # (Na,) indices into B*T
        if Tq == 0:
            return flat, x.new_zeros(0, C)
        xq = x.gather(1, order[..., None].expand(B, Tq, C))  # (B, Tq, C)
        q = F.linear(xq, self.qkv.weight[:C]).view(B, Tq, nh, hd).transpose(1, 2)  # (B, nh, Tq, hd)
        q = apply_rotary(q, cos[order].unsqueeze(1), sin[order].unsqueeze(1))
        # Query at position past+order may see keys 0..past+order.
        mask = torch.arange(past + T, device=x.device) <= past + order[..., None]  # (B, Tq, past+T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))  # (B, nh, Tq, hd)
        y = self.proj(y.transpose(1, 2).reshape(B, Tq, C))  # (B, Tq, C)
        return flat, y[valid]
