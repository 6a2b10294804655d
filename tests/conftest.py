"""Shared test set-up: the WikiText-2 location and small seeded batches."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Tiny models: one thread is as fast as two, and it keeps the suite steady when other work shares the cores
# (the subprocesses that tests start inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# CI clones the repo with shared/ beside it; EASE_DATA_DIR (set by .ci/run) wins when present.
os.environ.setdefault("EASE_DATA_DIR", str(REPO.parent / "shared" / "data" / "wikitext-2"))
WIKITEXT_DIR = Path(os.environ["EASE_DATA_DIR"])
# No model hub is reachable: transformers must load local folders only (tests save models with save_pretrained).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


TIMING_KEYS = {"train_time_s", "tokens_per_s", "eval_time_s"}


def strip_timing(obj):
    """Metrics without wall-clock figures, which legitimately differ between runs."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def train_py(*args: str, env: dict | None = None, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python train.py ARGS` as a subprocess, output captured; tests/ is on its path (for `killswitch`)."""
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
    )  # fmt: skip


def peaky_model(vocab: int, dim: int, layers: int, heads: int):
    """A seeded eval-mode model with a scaled-up head: peaky distributions, so confidences spread out."""
    from ease.model import EarlyExitTransformer

    torch.manual_seed(0)
    m = EarlyExitTransformer(vocab, dim, layers, num_heads=heads).eval()
    with torch.no_grad():
        m.output_head.weight.mul_(60.0)
    return m


def random_batches(vocab_size: int, n: int = 3, batch: int = 4, seq: int = 16, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab_size, (batch, seq + 1), generator=g)
        out.append((x[:, :-1], x[:, 1:]))
    return out


def between(conf: torch.Tensor, q: float, gap: float = 1e-6) -> float:
    """A threshold halfway between two neighbouring confidences near quantile q, so no token sits on it."""
    values = conf.flatten().double().sort().values
    i = min(max(int(q * (values.numel() - 1)), 0), values.numel() - 2)
    while values[i + 1] - values[i] < gap:
        i += 1
    return ((values[i] + values[i + 1]) / 2).item()


@pytest.fixture
def batches() -> list:
    return random_batches(50)


@pytest.fixture
def wikitext_dir() -> Path:
    if not (WIKITEXT_DIR / "wiki.valid.tokens").exists():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT_DIR}: set EASE_DATA_DIR")
    return WIKITEXT_DIR


def compose(overrides: list[str] | None = None, hydra_config: bool = False):
    """Compose conf/config.yaml with Hydra's compose API, as train.py would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ease.app.schema import register_configs

    register_configs(REPO)
    with initialize_config_dir(config_dir=str(REPO / "conf"), job_name="test"):
        return hydra_compose("config", overrides=list(overrides or []), return_hydra_config=hydra_config)


# Shrinks any run to seconds: tiny model, synthetic tokens, one epoch, no progress bar.
FAST = ["model=tiny", "data=synthetic", "data.synthetic_tokens=6000", "train.max_epochs=1", "progress=false"]
