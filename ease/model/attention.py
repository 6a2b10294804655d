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

from ease.model.row_cache import RowLengths, row_mask, write_kv_rows


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

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for given positions (B, T) long, each (B, 1, T, hd/2): broadcast over the heads."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.cos_table.shape[0]:
            self._build(max(2 * self.cos_table.shape[0], needed))
        return self.cos_table[positions].unsqueeze(1), self.sin_table[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) of the head dimension; x is (B, nh, T, hd), cos/sin (T, hd/2) or broadcastable."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hd/2) each
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


def _rotate(out: torch.Tensor, x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> None:
    """out = x·cos2 + swap(x)·sin2, swap exchanging the halves of the last dimension (the same rounding as
    `apply_rotary`, whose x1·cos - x2·sin is x1·cos + x2·(-sin) exactly). x, out: (..., hd); cos2, sin2: (T, hd).
    Four whole-width operations instead of eight on the halves, which are too short to vectorise on CPU."""
    x1, x2 = x.chunk(2, dim=-1)
    swapped = torch.cat((x2, x1), dim=-1).mul_(sin2)
    torch.mul(x, cos2, out=out)
    out.add_(swapped)


class _RotaryHeads(torch.autograd.Function):
    """The fused projection (B, T, 3C) -> q, k (rotated) and v, each (B, nh, T, hd), views of one buffer.

    The same values as splitting, viewing as heads and calling `apply_rotary` on q and k, bit for bit, in
    both directions. It writes q, k, v into one buffer and their gradients into the projection's, where
    autograd's chain (chunks, eight products, two concatenations, the split's concatenation) allocates a
    tensor per operation; on CPU those allocations cost as much as the arithmetic. The backward rotates by
    -θ: dx1 = g1·cos + g2·sin, dx2 = g2·cos - g1·sin.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> tuple:
        B, T, C3 = qkv.shape
        hd = C3 // (3 * num_heads)
        src = qkv.view(B, T, 3, num_heads, hd).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hd), a view
        out = torch.empty(src.shape, dtype=qkv.dtype, device=qkv.device)
        cos2, sin2 = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # (T, hd)
        if qkv.dtype == torch.float32:
            _rotate(out[:2], src[:2], cos2, sin2)
        else:  # rotate in float32, as apply_rotary does
            rotated = torch.empty(out[:2].shape, dtype=torch.float32, device=qkv.device)
            _rotate(rotated, src[:2].float(), cos2, sin2)
            out[:2].copy_(rotated)
        out[2].copy_(src[2])
        ctx.save_for_backward(cos2, sin2)
        ctx.shape = (B, T, 3, num_heads, hd)
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple:
        cos2, sin2 = ctx.saved_tensors
        B, T, _, nh, hd = ctx.shape
        like = next(g for g in grads if g is not None)
        grad = torch.empty((B, T, 3 * nh * hd), dtype=like.dtype, device=like.device)
        dst = grad.view(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hd), a view
        for i, g in enumerate(grads):
            if g is None:
                dst[i].zero_()
            elif i == 2:
                dst[i].copy_(g)
            elif g.dtype == torch.float32:  # rotating by -θ: swap(g) times -sin2
                _rotate(dst[i], g, cos2, -sin2)
            else:
                back = torch.empty(g.shape, dtype=torch.float32, device=g.device)
                _rotate(back, g.float(), cos2, -sin2)
                dst[i].copy_(back)
        return grad, None, None, None


def rotary_heads(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, 3C) fused projection -> q, k rotated by RoPE and v, each (B, nh, T, hd)."""
    return _RotaryHeads.apply(qkv, cos, sin, num_heads)


@dataclass
class KVCache:
    """One layer's keys and values so far, each (B, nh, T_past, hd).

    `rows`, when set, holds each row's own length (`ease.model.row_cache`): slot t is position t, and slots at
    or past a row's length are stale. None: every row holds all T_past positions."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    rows: RowLengths | None = None
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # with `rows`: what k and v are views of

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.buffers = None  # k and v become new tensors
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v

    def append_rows(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row lengths: write k, v (B, nh, T, hd) after each row's length -> all keys, values and the
        (B, 1, T, S) mask of the slots each query may see."""
        assert self.rows is not None
        mask = row_mask(self.rows, k.shape[2])
        self.k, self.v, self.buffers, self.rows = write_kv_rows(self.k, self.v, self.buffers, k, v, self.rows)
        return self.k, self.v, mask

    def crop(self, length: int, rows: RowLengths | None = None) -> None:
        """Keep slots 0..length-1; `rows` (whose longest is `length`) gives each row a length of its own."""
        if self.k is not None and self.length > length:
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]
        self.rows = rows


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

    def project_kv(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated, unless cos is None: learned positions) and values only: what a skipped layer must
        still provide to later tokens."""
        dim = self.num_heads * self.head_dim
        kv = F.linear(x, self.qkv.weight[dim:])  # (B, T, 2C)
        k, v = kv.split(dim, dim=-1)
        k = self._heads(k)
        return (k if cos is None else apply_rotary(k, cos, sin)), self._heads(v)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) normalised input at positions past..past+T-1 -> (B, T, C). cos None: no RoPE (the
        model adds learned positions to its embedding instead, `model.positions=learned`)."""
        B, T, C = x.shape
        if cos is None:
            q, k, v = (self._heads(t) for t in self.qkv(x).split(C, dim=-1))  # (B, nh, T, hd) views
        else:
            q, k, v = rotary_heads(self.qkv(x), cos, sin, self.num_heads)  # (B, nh, T, hd) each, q and k rotated
        past = 0 if cache is None else cache.length
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None and cache.rows is not None:  # rows of different lengths: each row's own causal mask
            k, v, rows_mask = cache.append_rows(k, v)  # (B, nh, S, hd), (B, 1, T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=rows_mask, dropout_p=dropout_p)
            return self.proj(y.transpose(1, 2).reshape(B, T, C))
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, past+T, hd)
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
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
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
        rows = None if cache is None else cache.rows
        if rows is not None:
            k, v, _ = cache.append_rows(k, v)  # (B, nh, S, hd)
        elif cache is not None:
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
        if cos is not None:
            q = apply_rotary(q, cos[order].unsqueeze(1), sin[order].unsqueeze(1))
        # Query at position past+order may see keys 0..past+order (past: its row's own length, with `rows`).
        start = past if rows is None else rows.lengths[:, None, None]
        mask = torch.arange(k.shape[2], device=x.device) <= start + order[..., None]  # (B, Tq, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))  # (B, nh, Tq, hd)
        y = self.proj(y.transpose(1, 2).reshape(B, Tq, C))  # (B, Tq, C)
        return flat, y[valid]
