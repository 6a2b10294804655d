"""Mixture-of-Depths: the wall time of a forward at capacity c against the same model at full depth.

    python benchmarks/mod.py            # dims 512 and 1024; merges the key `mod` into benchmarks/results.json
    python benchmarks/mod.py --device cuda

An untrained native model (6 layers, 8 heads, vocabulary 2000), batch 4 x 256 tokens, one CPU thread. The
baseline is the plain model (no wrapper); each MoD setting wraps the same weights with routers of std 1 (any
routing costs the same). Each timing is the minimum of 3 rounds of 2 forwards (torch.inference_mode), settings
alternating within a round. Reported: the counted compute cost (share of token-layer block computations run),
the speedup over the plain model, and the ideal speedup 1 / compute cost (blocks only: embedding and head run in
full, so the ideal is not reachable).
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from ease import EarlyExitTransformer  # noqa: E402
from ease.io import write_json_atomic  # noqa: E402
from ease.model.mod import MixtureOfDepths, MoDConfig  # noqa: E402

V, L, HEADS, BATCH, SEQ = 2000, 6, 8, 4, 256
ROUNDS = 3
SETTINGS = {  # name: (capacity, every)
    "every_other_c0.5": (0.5, 2),
    "every_other_c0.125": (0.125, 2),
    "every_c0.5": (0.5, 1),
    "every_c0.125": (0.125, 1),
}


def timed(model: torch.nn.Module, x: torch.Tensor, device: str) -> float:
    with torch.inference_mode():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(2):
            model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 2


def rows_for(dim: int, device: str) -> list[dict]:
    torch.manual_seed(0)
    base = EarlyExitTransformer(V, dim, L, num_heads=HEADS).to(device).eval()
    x = torch.randint(0, V, (BATCH, SEQ), device=device)
    models: dict[str, torch.nn.Module] = {"full": base}
    for name, (capacity, every) in SETTINGS.items():
        mod = MixtureOfDepths(base, MoDConfig(capacity=capacity, every=every).capacities(L)).to(device).eval()
        for router in mod.routers.values():
            torch.nn.init.normal_(router.weight, std=1.0)
        models[name] = mod
    for model in models.values():  # warm-up
        timed(model, x, device)
    best = {name: float("inf") for name in models}
    for _ in range(ROUNDS):
        for name, model in models.items():
            best[name] = min(best[name], timed(model, x, device))
    rows = []
    for name, model in models.items():
        cost = 1.0
        if isinstance(model, MixtureOfDepths):
            model.reset_counts()
            with torch.inference_mode():
                model(x)
            cost = model.compute_cost
        rows.append({
            "dim": dim, "setting": name, "compute_cost": round(cost, 4), "forward_s": round(best[name], 5),
            "speedup": round(best["full"] / best[name], 3), "ideal_speedup": round(1 / cost, 3),
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dims", default="512,1024")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [row for dim in map(int, args.dims.split(",")) for row in rows_for(dim, args.device)]
    result = {
        "command": f"python benchmarks/mod.py --device {args.device} --dims {args.dims}",
        "setting": f"untrained native, {L} layers, {HEADS} heads, vocab {V}, batch {BATCH} x {SEQ}, top-k routing, "
        f"{'one thread' if args.device == 'cpu' else args.device}",
        "machine": machine(),
        "rows": rows,
    }
    path = REPO / "benchmarks" / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    key = "mod" if args.device == "cpu" else f"mod_{args.device.split(':')[0]}"
    results[key] = result  # merged: every other section of the file stays as it was
    write_json_atomic(path, results)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
