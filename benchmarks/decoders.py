"""The two decoders side by side: the reference (the model's own blocks through the backbone protocol) and the
native fast path (folded weights, preallocated caches), at full depth and with early exits.

    python benchmarks/decoders.py          # writes benchmarks/decoders.json and benchmarks/decoders.md

Untrained models with a scaled-up head (peaky confidences), thresholds at the median layer-1 confidence, so
about half the tokens exit at layer 1; batch 1 and 8; dim 64 (the seeds' size: per-operation overhead
dominates) and dim 512 (arithmetic matters). Greedy decoding of 64 tokens after an 8-token prompt, one thread.
Both decoders produce the same tokens and exits (checked here and in tests/test_decoding.py).
"""

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from ease import EarlyExitTransformer  # noqa: E402
from ease.inference.generation import SamplingConfig, decode  # noqa: E402
from ease.routing import max_prob  # noqa: E402

OUT = Path(__file__).resolve().parent


def peaky(dim: int, vocab: int = 1000, layers: int = 4) -> EarlyExitTransformer:
    torch.manual_seed(0)
    model = EarlyExitTransformer(vocab, dim, layers, num_heads=max(2, dim // 64)).eval()
    with torch.no_grad():
        model.output_head.weight.mul_(40.0)
    return model


def median_threshold(model: EarlyExitTransformer, prompt: torch.Tensor) -> float:
    with torch.no_grad():
        ids = torch.randint(0, model.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
        return float(max_prob(model(ids, [1])[1]).median())


def timed(model, prompt, sampling, threshold, repeats: int = 3):
    best, run = float("inf"), None
    for _ in range(repeats):
        run = decode(model, prompt, sampling, exit_layer=1, routing_threshold=threshold)
        best = min(best, run.seconds)
    return run, best


def main() -> None:
    torch.set_num_threads(1)
    rows, records = [], []
    for dim in (64, 512):
        model = peaky(dim)
        for batch in (1, 8):
            prompt = torch.randint(0, model.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(2))
            threshold = median_threshold(model, prompt)
            for label, t in (("full depth", 0.0), ("early exit", threshold)):
                result = {}
                for decoder in ("reference", "fused"):
                    sampling = SamplingConfig(max_new_tokens=64, batch_size=batch, decoder=decoder)
                    run, seconds = timed(model, prompt, sampling, t)
                    result[decoder] = (run, batch * 64 / seconds)
                same = torch.equal(result["reference"][0].tokens, result["fused"][0].tokens) and torch.equal(
                    result["reference"][0].exit_layers, result["fused"][0].exit_layers
                )
                layers = result["fused"][0].exit_layers.double().mean().item()
                ref_tps, fused_tps = result["reference"][1], result["fused"][1]
                records.append({
                    "dim": dim, "batch": batch, "routing": label, "mean_layers": layers,
                    "reference_tokens_per_s": ref_tps, "fused_tokens_per_s": fused_tps,
                    "fused_over_reference": fused_tps / ref_tps, "same_tokens_and_exits": same,
                })  # fmt: skip
                rows.append([dim, batch, label, f"{layers:.2f}", f"{ref_tps:.0f}", f"{fused_tps:.0f}",
                             f"{fused_tps / ref_tps:.2f}", same])  # fmt: skip
    headers = ["dim", "batch", "routing", "layers/token", "reference tok/s", "fused tok/s", "fused/ref", "same"]
    table = tabulate(rows, headers=headers, tablefmt="github")
    stamp = time.strftime("%Y-%m-%d %H:%M")
    (OUT / "decoders.json").write_text(json.dumps({"measured": stamp, "rows": records}, indent=2) + "\n")
    (OUT / "decoders.md").write_text(
        f"# Decoders: reference vs fused ({stamp}, `python benchmarks/decoders.py`, 1 thread, 4 layers, vocab 1000)\n\n"
        f"{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
