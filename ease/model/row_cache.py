"""Per-row cache lengths: the rows of one batch hold different numbers of cached positions.

Self-speculative decoding keeps every row in one batch while rows accept different numbers of drafted tokens, so
after a round row b's cache holds its own n_b positions. A layer's K/V store stays one tensor (B, nh, S, hd) whose
slot t holds position t; slots at or past a row's length are stale (rejected drafts) and never attended: a call
writes row b's T new tokens at slots n_b..n_b+T-1 and its query t sees slots 0..n_b+t only. Every call writes
from the row's length on, so a stale slot is overwritten before any query can see it. The native `KVCache` and
the Hugging Face adapter's cache both use `write_kv_rows` and `row_mask`.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLengths:
    """Each row's cached positions (B,) long, and their maximum as an int (the store's length, no device sync)."""

    lengths: torch.Tensor
    longest: int


def row_lengths(lengths: int | torch.Tensor) -> tuple[int, RowLengths | None]:
    """The longest of (B,) lengths, and their RowLengths, None when every row holds the same number (the plain
    cache then applies; an int is that case)."""
    if not isinstance(lengths, torch.Tensor):
        return lengths, None
    lo, hi = (int(x) for x in lengths.aminmax())
    return hi, None if lo == hi else RowLengths(lengths.long().clone(), hi)  # a copy: the caller may change its own


def write_rows(
    store: torch.Tensor | None, buffer: torch.Tensor | None, new: torch.Tensor, rows: RowLengths
) -> tuple[torch.Tensor, torch.Tensor, RowLengths]:
    """Write new (B, nh, T, hd) at slots n_b..n_b+T-1 -> (buffer, store, lengths + T).

    `store` (B, nh, >= longest, hd) holds the cached slots; `buffer`, when not None, is the tensor it is a view of,
    with room to grow: the new slots are written into it in place (no copy of the whole cache per call, as
    appending by concatenation makes). The returned store is the buffer's first `longest + T` slots."""
    B, nh, T, hd = new.shape
    size = rows.longest + T
    if buffer is None or buffer.shape[2] < size:
        grown = new.new_zeros(B, nh, 2 * size, hd)
        if store is not None:
            grown[:, :, : rows.longest] = store[:, :, : rows.longest]
        buffer = grown
    slots = rows.lengths[:, None] + torch.arange(T, device=new.device)  # (B, T)
    buffer.scatter_(2, slots[:, None, :, None].expand(B, nh, T, hd), new)
    return buffer, buffer[:, :, :size], RowLengths(rows.lengths + T, size)


def write_kv_rows(
    keys: torch.Tensor | None,
    values: torch.Tensor | None,
    buffers: tuple[torch.Tensor, torch.Tensor] | None,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: RowLengths,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], RowLengths]:
    """`write_rows` for one layer's keys and values -> (keys, values, their buffers, lengths + T)."""
    k_buffer, v_buffer = buffers or (None, None)
    k_buffer, keys, _ = write_rows(keys, k_buffer, k, rows)
    v_buffer, values, rows = write_rows(values, v_buffer, v, rows)
    return keys, values, (k_buffer, v_buffer), rows


def row_mask(rows: RowLengths, length: int) -> torch.Tensor:
    """(B, 1, T, longest + T) bool for a call of T = `length` tokens: query t of row b (at position n_b + t) sees
    slots 0..n_b+t. `rows` are the lengths before the call's tokens were written."""
    device = rows.lengths.device
    query = rows.lengths[:, None] + torch.arange(length, device=device)  # (B, T) positions
    slot = torch.arange(rows.longest + length, device=device)
    return (slot <= query[..., None])[:, None]
