"""What every benchmark section shares: the data, the training methods, the machine's state, subprocesses."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ease.data import DataBundle, DataConfig, build_data
from ease.losses import asymmetric, final_only, uniform

REPO = Path(__file__).resolve().parents[1]
# The seeds' setting: vocabulary 1000, dim 64, 3 layers, sequences of 64, batches of 32.
SEED_SIZE = {"vocab_size": 1000, "dim": 64, "num_layers": 3, "num_heads": 4, "seq_len": 64, "batch_size": 32}
_SHARED_DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def benchmark_data(seq_len: int, batch_size: int, vocab_size: int, max_chars: int = 200_000) -> DataBundle:
    """WikiText-2 (word tokenizer) where it can be found, else synthetic tokens of the same vocabulary size."""
    if "EASE_DATA_DIR" not in os.environ and _SHARED_DATA.is_dir():
        os.environ["EASE_DATA_DIR"] = str(_SHARED_DATA)
    cfg = DataConfig(vocab_size=vocab_size, seq_len=seq_len, batch_size=batch_size, max_chars=max_chars)
    try:
        return build_data(cfg, seed=0)
    except ValueError:
        synthetic = DataConfig(
            name="synthetic", seq_len=seq_len, batch_size=batch_size, synthetic_vocab_size=vocab_size,
            synthetic_tokens=max_chars // 5,
        )  # fmt: skip
        return build_data(synthetic, seed=0)


def method_weights(method: str, num_layers: int) -> dict[int, float]:
    """The loss weights of the three training methods the benchmark compares."""
    if method == "standard":
        return final_only(num_layers)
    if method == "deep_supervision":
        return uniform(num_layers)
    if method == "asymmetric":
        return asymmetric(num_layers, 0.7)  # seed 003's best setting: 0.7 on layer 1, 0.3 on the last
    raise ValueError(f"method: must be standard, deep_supervision or asymmetric, got {method!r}")


def machine() -> dict[str, Any]:
    """What the numbers were measured on, with the load average (the CPU may be shared)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average": list(load) if load else None,
    }


def run_worker(
    module: str, spec: dict[str, Any], timeout: int = 1800, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `python -m benchmarks.MODULE SPEC_JSON` from the repo root; its last stdout line is JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", json.dumps(spec)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks.{module} {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
