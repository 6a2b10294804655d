"""Phase-2 batches: the cached windows that hold at least one hard token, in a per-epoch shuffled order."""

from collections.abc import Iterator

import torch

from ease.strategies.ashem.cache import HardExamples

HardBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden (B, T, C), targets (B, T), hard mask (B, T)


class HardExampleBatches:
    """Re-iterable batches of the windows that hold at least one hard token.

    `batch_size` counts windows (sequences), like `TokenBatches`; each yields (hidden, targets, hard_mask).
    With `shuffle`, the order is a function of (seed, epoch) only: iterating never changes it, `set_epoch(e)`
    selects epoch e's order.
    """

    def __init__(self, hard: HardExamples, batch_size: int = 64, shuffle: bool = True, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        keep = hard.hard_mask.any(dim=1).nonzero().squeeze(1)  # windows with a hard token
        if keep.numel() == 0:
            raise ValueError("create_hard_example_loader: no hard tokens (raise hard_example_ratio)")
        self.hidden = hard.hidden_states[keep]
        self.targets = hard.targets[keep]
        self.mask = hard.hard_mask[keep]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    @property
    def num_hard_tokens(self) -> int:
        return int(self.mask.sum().item())

    @property
    def num_positions(self) -> int:
        """Positions Block 2 runs over per epoch (hard tokens and their context)."""
        return self.mask.numel()

    def __len__(self) -> int:
        return -(-self.hidden.shape[0] // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> torch.Tensor:
        n = self.hidden.shape[0]
        if not self.shuffle:
            return torch.arange(n)
        seed = (self.seed * 1_000_003 + epoch) % 2**64  # within torch's seed range for any int seed
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def __iter__(self) -> Iterator[HardBatch]:
        order = self.order(self.epoch)
        for start in range(0, order.numel(), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.hidden[index], self.targets[index], self.mask[index]


def create_hard_example_loader(
    hard_examples: HardExamples, batch_size: int = 64, shuffle: bool = True, seed: int = 0
) -> HardExampleBatches:
    """Batches of the cached windows that contain hard tokens (seed 002)."""
    return HardExampleBatches(hard_examples, batch_size, shuffle, seed)
