"""(a) training throughput and (d) peak training memory, one configuration per fresh process.

`python -m benchmarks.training '{"method": "deep_supervision", "dim": 64, ...}'` trains a few steps with the
library's own `Trainer.train_epoch` (the code path `train.py` runs) and prints one JSON line: tokens/s and
peak memory. tokens/s is batch tokens / the median step time (each step timed alone), so a step slowed by
another process on a shared CPU does not move it; `tokens_per_s_mean` is the plain mean for comparison.
A fresh process per configuration keeps the memory peaks apart (the peak resident set size only grows
within a process) and keeps one configuration's allocator state from favouring the next.

Peak memory is the resident set size: `peak_rss_mb` is the process's high-water mark during training
(VmHWM, reset just before the first step through /proc/self/clear_refs), `train_peak_mb` that peak minus
the resident size before the first step (model, data and optimizer already built): activations, gradients,
Adam's moments and allocator caching.
"""

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import benchmark_data, method_weights
from benchmarks.flops import training_flops
from ease import EarlyExitTransformer, Trainer, TrainingConfig

METHODS = ("standard", "deep_supervision", "asymmetric")


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Train `spec["steps"]` batches after `spec["warmup"]` batches; tokens/s and peak memory."""
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    data = benchmark_data(spec["seq_len"], spec["batch_size"], spec["vocab_size"])
    full = [(x, y) for x, y in data.train if x.shape == (spec["batch_size"], spec["seq_len"])]  # same shape
    needed = spec["warmup"] + spec["steps"]
    batches = (full * (1 + needed // len(full)))[:needed]  # a small corpus goes round again
    L = spec["num_layers"]
    model = EarlyExitTransformer(data.vocab_size, spec["dim"], L, num_heads=spec["num_heads"])
    if spec.get("compile"):
        for block in model.layers:
            block.compile()
    weights = method_weights(spec["method"], L)
    trainer = Trainer(TrainingConfig(layer_weights=weights, routing_threshold=0.0))
    optimizer = trainer.create_optimizer(model, 1e-3)
    rss_before = _status_kb("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    trainer.train_epoch(model, batches[: spec["warmup"]], optimizer)
    warmup_s = time.perf_counter() - start
    step_s = []
    for batch in batches[spec["warmup"] :]:  # one step per call, so each step is timed on its own
        start = time.perf_counter()
        trainer.train_epoch(model, [batch], optimizer)
        step_s.append(time.perf_counter() - start)
    peak = _status_kb("VmHWM") if reset else None
    tokens = spec["batch_size"] * spec["seq_len"]  # per step
    heads = sum(1 for w in weights.values() if w > 0)
    return {
        **spec,
        "vocab_size": data.vocab_size,
        "data_source": data.source,
        "weighted_exits": heads,
        "tokens_per_s": tokens / statistics.median(step_s),
        "tokens_per_s_mean": tokens * len(step_s) / sum(step_s),
        "step_s_median": statistics.median(step_s),
        "warmup_s": warmup_s,
        "flops_per_token": training_flops(spec["dim"], L, data.vocab_size, spec["seq_len"], heads),
        "peak_rss_mb": peak / 1024 if peak else None,
        "train_peak_mb": (peak - rss_before) / 1024 if peak and rss_before else None,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
