"""Cutting a 1-D token stream into (input, target) batches for next-token prediction."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch

T = TypeVar("T", list[int], torch.Tensor)

_MASK64 = (1 << 64) - 1


def split_train_val(ids: T, val_fraction: float) -> tuple[T, T]:
    """Split a token sequence contiguously: the first part trains, the last ``val_fraction`` validates.

    Args:
        ids: List or 1-D tensor of token ids.
        val_fraction: Share of tokens for validation, in (0, 1).

    Returns:
        ``(train_ids, val_ids)`` of the same type as ``ids``.

    Raises:
        ValueError: The fraction is out of range or leaves one part empty.
    """
    if isinstance(val_fraction, bool) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction: must be in (0, 1), got {val_fraction!r}")
    n = len(ids)
    n_val = round(n * val_fraction)
    if n_val < 1 or n_val >= n:
        raise ValueError(f"data.val_fraction: {val_fraction} of {n} tokens leaves the train or val part empty")
    return ids[: n - n_val], ids[n - n_val :]


def _mix(seed: int, epoch: int) -> int:
    """Hash (seed, epoch) into one 64-bit generator seed (splitmix64), so nearby pairs give unrelated orders."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class TokenBatches:
    """Re-iterable ``(x, y)`` batches of shape ``(batch, seq_len)`` from one token stream.

    The stream is cut into non-overlapping windows of ``seq_len + 1`` tokens with stride ``seq_len``
    (neighbouring windows share their boundary token); ``x = window[:-1]``, ``y = window[1:]``. Tokens after
    the last full window (fewer than ``seq_len``) are unused.

    With ``shuffle``, the window order is a function of ``(seed, epoch)`` only, and iterating never changes
    state: ``set_epoch(e)`` selects epoch ``e``'s order, and every iteration until the next ``set_epoch``
    gives that same order (a progress bar that calls ``iter()`` twice sees the same batches).
    ``Trainer.train_epoch`` sets the epoch before each pass.
    """

    def __init__(
        self,
        ids: Sequence[int] | torch.Tensor,
        seq_len: int,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        label: str = "data",
    ) -> None:
        """Cut ``ids`` into windows.

        Args:
            ids: 1-D token ids (list or tensor).
            seq_len: Tokens per input sequence.
            batch_size: Sequences per batch.
            shuffle: Shuffle window order per epoch.
            seed: Seed of the shuffle.
            drop_last: Drop the last batch when it is smaller than ``batch_size``.
            label: What the ids are (``"train split"``...), for error messages.

        Raises:
            ValueError: Bad sizes, or the data is shorter than one window.
        """
        for field, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{field}: must be an int >= 1, got {value!r}")
        tokens = torch.as_tensor(ids, dtype=torch.long)
        if tokens.dim() != 1:
            raise ValueError(f"token ids must be 1-D, got shape {tuple(tokens.shape)}")
        n = tokens.numel()
        if n < seq_len + 1:
            raise ValueError(f"data.seq_len: {seq_len} (+1 target) is longer than the {label} ({n} tokens)")
        num_windows = (n - 1) // seq_len
        if drop_last and num_windows < batch_size:
            raise ValueError(
                f"data.batch_size: {batch_size} with drop_last leaves no batch of the {label} ({num_windows} windows)"
            )
        used = num_windows * seq_len
        # Two views of one contiguous buffer; a batch is an index_select on the window axis.
        self.x = tokens[:used].view(num_windows, seq_len)  # (W, T)
        self.y = tokens[1 : used + 1].view(num_windows, seq_len)  # (W, T)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    @property
    def num_windows(self) -> int:
        """Number of sequences per epoch."""
        return self.x.shape[0]

    @property
    def num_tokens(self) -> int:
        """Target tokens per epoch (``num_windows * seq_len``)."""
        return self.x.numel()

    def __len__(self) -> int:
        """Number of batches per epoch."""
        if self.drop_last:
            return self.num_windows // self.batch_size
        return -(-self.num_windows // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make every following iteration use ``epoch``'s window order."""
        self.epoch = epoch

    def order(self, epoch: int) -> torch.Tensor:
        """Window indices in the order epoch ``epoch`` visits them."""
        if not self.shuffle:
            return torch.arange(self.num_windows)
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(self.num_windows, generator=generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` LongTensor pairs of shape ``(batch, seq_len)``; the last may be smaller."""
        return self._batches(self.order(self.epoch))

    def _batches(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.x.index_select(0, index), self.y.index_select(0, index)  # (B, T) each
