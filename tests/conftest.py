"""Shared test set-up: the WikiText-2 location and small seeded batches."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# CI clones the repo with shared/ beside it; EASE_DATA_DIR (set by .ci/run) wins when present.
os.environ.setdefault("EASE_DATA_DIR", str(REPO.parent / "shared" / "data" / "wikitext-2"))
WIKITEXT_DIR = Path(os.environ["EASE_DATA_DIR"])


def random_batches(vocab_size: int, n: int = 3, batch: int = 4, seq: int = 16, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab_size, (batch, seq + 1), generator=g)
        out.append((x[:, :-1], x[:, 1:]))
    return out


@pytest.fixture
def batches() -> list:
    return random_batches(50)


@pytest.fixture
def wikitext_dir() -> Path:
    if not (WIKITEXT_DIR / "wiki.valid.tokens").exists():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT_DIR}: set EASE_DATA_DIR")
    return WIKITEXT_DIR
