"""Cutting a 1-D token stream into (input, target) batches for next-token prediction."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np
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
    ``Trainer.train_epoch`` sets the epoch before each pass; ``batch(epoch, index)`` reads any one batch
    directly, so a run can resume in the middle of an epoch.

    The ids may be a list, a tensor, or a 1-D numpy array such as an ``np.memmap`` of uint16/uint32 token ids
    (``data=files``): a numpy array is never copied, each batch gathers its windows from it and converts them
    to int64, so memory does not grow with the corpus.

    ``shard(rank, world_size)`` gives one process's view under data parallelism: every batch (the global
    batch of ``batch_size`` windows) is split into ``world_size`` contiguous row blocks and the rank reads its
    own, so the ranks together see exactly the windows one process would.
    """

    def __init__(
        self,
        ids: Sequence[int] | torch.Tensor | np.ndarray,
        seq_len: int,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        label: str = "data",
    ) -> None:
        """Cut ``ids`` into windows.

        Args:
            ids: 1-D token ids (list, tensor or numpy array / memmap).
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
        if isinstance(ids, np.ndarray):
            store: torch.Tensor | np.ndarray = ids
            if ids.ndim != 1:
                raise ValueError(f"token ids must be 1-D, got shape {tuple(ids.shape)}")
            n = int(ids.shape[0])
        else:
            store = torch.as_tensor(ids, dtype=torch.long)
            if store.dim() != 1:
                raise ValueError(f"token ids must be 1-D, got shape {tuple(store.shape)}")
            n = store.numel()
        if n < seq_len + 1:
            raise ValueError(f"data.seq_len: {seq_len} (+1 target) is longer than the {label} ({n} tokens)")
        num_windows = (n - 1) // seq_len
        if drop_last and num_windows < batch_size:
            raise ValueError(
                f"data.batch_size: {batch_size} with drop_last leaves no batch of the {label} ({num_windows} windows)"
            )
        self.tokens = store
        self._num_windows = num_windows
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.label = label
        self.epoch = 0
        self.rank, self.world_size = 0, 1
        if isinstance(store, torch.Tensor):
            used = num_windows * seq_len
            # Two views of one contiguous buffer; a batch is an index_select on the window axis.
            self.x = store[:used].view(num_windows, seq_len)  # (W, T)
            self.y = store[1 : used + 1].view(num_windows, seq_len)  # (W, T)

    @property
    def num_windows(self) -> int:
        """Number of sequences per epoch."""
        return self._num_windows

    @property
    def num_tokens(self) -> int:
        """Target tokens per epoch (``num_windows * seq_len``)."""
        return self._num_windows * self.seq_len

    def __len__(self) -> int:
        """Number of batches per epoch."""
        if self.drop_last:
            return self.num_windows // self.batch_size
        return -(-self.num_windows // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make every following iteration use ``epoch``'s window order."""
        self.epoch = epoch

    def shard(self, rank: int, world_size: int) -> TokenBatches:
        """This rank's view: the same windows and order, each batch cut to the rank's block of rows."""
        if not 0 <= rank < world_size:
            raise ValueError(f"shard: rank must be in 0..{world_size - 1}, got {rank}")
        view = copy.copy(self)
        view.rank, view.world_size = rank, world_size
        return view

    def order(self, epoch: int) -> torch.Tensor:
        """Window indices in the order epoch ``epoch`` visits them."""
        if not self.shuffle:
            return torch.arange(self.num_windows)
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(self.num_windows, generator=generator)

    def batch_windows(self, order: torch.Tensor, index: int) -> torch.Tensor:
        """The window indices of batch ``index`` under ``order`` that this rank reads."""
        rows = order[index * self.batch_size : (index + 1) * self.batch_size]
        if self.world_size > 1:
            rows = torch.tensor_split(rows, self.world_size)[self.rank]
        return rows

    def windows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of the given windows, int64, shape ``(len(index), seq_len)`` each."""
        if isinstance(self.tokens, torch.Tensor):
            return self.x.index_select(0, index), self.y.index_select(0, index)
        starts = index.numpy().astype(np.int64) * self.seq_len
        # Fancy indexing reads only these windows' pages of a memmap.
        block = torch.from_numpy(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64))
        return block[:, :-1], block[:, 1:]  # (B, T) each

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` (0-based) of epoch ``epoch``, as iteration would give it."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range 0..{len(self) - 1}")
        return self.windows(self.batch_windows(self.order(epoch), index))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` LongTensor pairs of shape ``(batch, seq_len)``; the last may be smaller."""
        return self.iter_from(self.epoch, 0)

    def iter_from(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Epoch ``epoch``'s batches from batch ``start`` on."""
        order = self.order(epoch)
        for b in range(start, len(self)):
            yield self.windows(self.batch_windows(order, b))

    def target_sample(self, limit: int = 1_000_000) -> torch.Tensor:
        """Up to ``limit`` target ids from the start of the stream (for checks such as the unknown-token share)."""
        n = min(self.num_tokens, limit)
        if isinstance(self.tokens, torch.Tensor):
            return self.tokens[1 : n + 1]
        return torch.from_numpy(np.asarray(self.tokens[1 : n + 1]).astype(np.int64))
