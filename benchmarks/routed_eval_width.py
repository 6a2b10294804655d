"""Routed full-sequence evaluation that skips compute, against full depth, at widths where compute matters.

    python benchmarks/routed_eval_width.py     # dims 256, 512, 1024; writes benchmarks/routed_eval_width.json/.md

An untrained native model (6 layers, vocabulary 2000) with its head scaled up (peaky confidences, as
benchmarks/decoders.py does), exit at layer 2, the threshold set to the median layer-2 max-prob of the batch so
about half the tokens exit there. Batch 8 x 64 tokens, one thread. Three timings of `evaluate_routed` over the
same 4 batches, alternating, each the minimum of 3 rounds: full depth (routing off), counted (every layer, scored
at the exits) and skip (`skip_routed_forward`, propagate mode). Reported: shallow ratio, the share of (token,
layer) block computations skip ran, and skip's speedup over full depth beside the ideal 1 / layer fraction.
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from ease import EarlyExitTransformer  # noqa: E402
from ease.inference.routed_eval import evaluate_routed  # noqa: E402
from ease.routing import max_prob  # noqa: E402

V, L, EXIT = 2000, 6, 2


def row(dim: int) -> dict:
    torch.manual_seed(0)
    model = EarlyExitTransformer(V, dim, L, num_heads=8).eval()
    with torch.no_grad():
        model.output_head.weight.mul_(30.0)
    x, y = torch.randint(0, V, (8, 64)), torch.randint(0, V, (8, 64))
    with torch.inference_mode():
        h = model.embed(x)
        for i in range(1, EXIT + 1):
            h = model.layer(i, h)
        threshold = max_prob(model.unembed(h)).flatten().median().item()
    batches = [(x, y)] * 4
    runs = {"full": ("counted", 0.0), "counted": ("counted", threshold), "skip": ("skip", threshold)}
    best: dict[str, float] = {}
    last: dict[str, dict] = {}
    for _ in range(3):
        for name, (mode, t) in runs.items():
            last[name] = evaluate_routed(model, batches, mode, "propagate", EXIT, t)
            best[name] = min(best.get(name, float("inf")), last[name]["time_s"])
    skip = last["skip"]
    return {
        "dim": dim,
        "threshold": round(threshold, 4),
        "shallow_ratio": round(skip["shallow_ratio"], 3),
        "layer_fraction": round(skip["layer_fraction"], 3),
        "full_s": round(best["full"], 4),
        "counted_s": round(best["counted"], 4),
        "skip_s": round(best["skip"], 4),
        "skip_speedup_over_full": round(best["full"] / best["skip"], 3),
        "ideal_speedup": round(1 / skip["layer_fraction"], 3),
    }


def main() -> None:
    torch.set_num_threads(1)
    rows = [row(dim) for dim in (256, 512, 1024)]
    result = {"setting": f"untrained, {L} layers, vocab {V}, exit at layer {EXIT}, batch 8 x 64, one thread",
              "machine": machine(), "rows": rows}  # fmt: skip
    (REPO / "benchmarks" / "routed_eval_width.json").write_text(json.dumps(result, indent=2) + "\n")
    table = tabulate(rows, headers="keys", tablefmt="github")
    (REPO / "benchmarks" / "routed_eval_width.md").write_text(
        f"# Routed evaluation: skip vs full depth by width\n\n`python benchmarks/routed_eval_width.py`: "
        f"{result['setting']}.\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
