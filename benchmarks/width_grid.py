"""Early exit and self-speculative decoding over a width grid, trained briefly on WikiText-2.

    python benchmarks/width_grid.py                       # dims 512, 256, 1024 x 8 layers, CPU (~20 min, 2 cores)
    python benchmarks/width_grid.py --dims 128 --layers 4 --quick  # a smoke run
    python benchmarks/width_grid.py --device cuda --out benchmarks/gpu_results.json   # benchmarks/gpu.sh

For each width, a native model (8 layers, 8 heads, vocabulary 2000) is trained through `train.py` with deep
supervision (`+preset=deep_supervision`, every exit learns the next token: `benchmarks/speculative.train`) for one
epoch of the seeds' WikiText-2 text (200K characters; `--chars-1024` fewer at dim 1024, where an epoch takes longest).
Then, with the native fast decoder (`FusedDecoder`), one intra-op thread:

- lossy early exit at layer 1, propagate mode: the threshold calibrated (`ease.calibration.calibrate_threshold`,
  exit_share 0.5) on the confidences of a teacher-forced pass over validation text, so ~50% of tokens exit;
  batch 1 / 8 / 32 rows of different validation prompts, sampled tokens (`benchmarks.generation.time_pair`:
  early exit and routing off alternately, the same seed): speedup over full depth, the theoretical
  1 / compute_cost of the same run, and measured / theoretical;
- self-speculative decoding (`benchmarks.speculative.measure`, batch 1, greedy): whether every prompt's tokens
  equal full depth, acceptance, speedup over full depth, and measured / the speedup that acceptance and layer
  costs predict, for draft exits 1 and 2 (k = 4).

Written to benchmarks/width_grid.json and .md (or --out and its .md) after every width, and, on CPU runs of the
default grid, the headline keys (dim 512) merged into benchmarks/results.json (`speculative.*` and
`generation.speedup_over_theoretical_b1`, `generation.speedup_b8_over_full`, ...), other keys kept.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from benchmarks.generation import time_pair  # noqa: E402
from benchmarks.speculative import measure, train  # noqa: E402
from ease.calibration import calibrate_threshold  # noqa: E402
from ease.checkpoint import load_checkpoint  # noqa: E402
from ease.data.tokenizers import tokenizer_from_dict  # noqa: E402
from ease.evaluation import collect_token_stats  # noqa: E402

EXIT = 1
BATCHES = (1, 8, 32)
SPEC_SETTINGS = ((1, 4), (2, 4))


def data_dir() -> Path:
    default = REPO.parent / "shared" / "data" / "wikitext-2"
    return Path(os.environ.get("EASE_DATA_DIR", default))


def validation_ids(tokenizer: Any, words: int = 30_000) -> torch.Tensor:
    text = (data_dir() / "wiki.valid.tokens").read_text(encoding="utf-8")
    return torch.tensor(tokenizer.encode(" ".join(text.split()[:words])))


def prompts(ids: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """(count, length) prompts from evenly spaced places in the validation ids."""
    step = (ids.numel() - length) // count
    return torch.stack([ids[i * step : i * step + length] for i in range(count)])


def calibrate(model: Any, ids: torch.Tensor, device: str) -> dict[str, Any]:
    """The layer-1 threshold at which half the validation tokens (teacher-forced, batches of 64) exit."""
    n = (ids.numel() - 1) // 64 * 64
    x, y = ids[:n].view(-1, 64), ids[1 : n + 1].view(-1, 64)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, x.shape[0], 16)]
    stats = collect_token_stats(model, batches, [EXIT], device=device)
    return calibrate_threshold(stats, [EXIT], "exit_share", 0.5).to_dict()


def grid_row(dim: int, layers: int, epochs: int, chars: int, device: str, quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ease-width-grid-") as tmp:
        run_dir = Path(tmp) / "run"
        extra = [f"device={device}", f"data.max_chars={chars}"]
        trained = train(run_dir, dim, layers, 8, epochs, extra)
        model, ckpt = load_checkpoint(run_dir / "checkpoint.pt", device)
    model.eval()
    tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    ids = validation_ids(tokenizer, 3_000 if quick else 30_000)
    cal = calibrate(model, ids, device)
    tokens, repeats = (16, 1) if quick else (48, 3)
    generation = {}
    for batch in BATCHES:
        prompt = prompts(ids, batch, 16).to(device)
        row = time_pair(model, prompt, cal["threshold"], tokens, repeats if batch < 32 else 2, "propagate")
        generation[f"b{batch}"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
    spec_prompts = [p[None].to(device) for p in prompts(ids, 2 if quick else 6, 8)]
    n = 16 if quick else 48
    measure(model, spec_prompts[:1], 1, 4, 8)  # warm-up
    spec = [measure(model, spec_prompts, e, k, n) for e, k in SPEC_SETTINGS]
    best = max(spec, key=lambda r: r["speedup"])
    return {
        "dim": dim,
        "layers": layers,
        "training": {**trained, "epochs": epochs, "max_chars": chars},
        "calibration": cal,
        "generation": generation,
        "speculative": {"rows": spec, "best": best, "exact_match": all(r["exact_match"] for r in spec)},
    }


def summary(row: dict[str, Any]) -> dict[str, Any]:
    g, s = row["generation"], row["speculative"]["best"]
    out: dict[str, Any] = {"dim": row["dim"], "layers": row["layers"], "val_ppl": round(row["training"]["val_ppl"], 1)}
    out["early_share_b1"] = round(g["b1"]["early_exit_fraction"], 2)
    for b in BATCHES:
        r = g[f"b{b}"]
        out[f"b{b}_speedup"] = round(r["speedup"], 2)
        out[f"b{b}_theory"] = round(r["theoretical_speedup"], 2)
        out[f"b{b}_meas/theory"] = round(r["speedup_over_theoretical"], 2)
    out["spec_exact"] = row["speculative"]["exact_match"]
    out["spec_E,k"] = f"{s['draft_exit']},{s['k']}"
    out["spec_accept"] = s["acceptance"]
    out["spec_speedup"] = s["speedup"]
    out["spec_meas/pred"] = s["speedup_over_predicted"]
    return out


def write(result: dict[str, Any], out: Path, command: str) -> None:
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = tabulate([summary(r) for r in result["rows"]], headers="keys", tablefmt="github")
    out.with_suffix(".md").write_text(
        f"# Width grid: early exit and self-speculative decoding\n\n`{command}`: {result['setting']}.\n\n"
        f"bN = batch N, lossy early exit at layer {EXIT} (~50% exits, calibrated) vs full depth; theory = 1 / "
        "compute_cost of the same run; spec = self-speculative decoding at batch 1 (best of draft exit 1 and 2, "
        "k = 4), meas/pred = measured speedup / the one its acceptance and layer costs predict. Details per row "
        f"in {out.name}.\n\n{table}\n"
    )
    print(table, flush=True)


def merge_results(row: dict[str, Any], path: Path) -> None:
    """The issue's headline keys (dim 512) into results.json, keeping every other key."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    g, spec = row["generation"], row["speculative"]
    best = spec["best"]
    results.setdefault("speculative", {}).update(
        {
            "exact_match": spec["exact_match"],
            "speedup_b1": best["speedup"],
            "acceptance": best["acceptance"],
            "draft_exit": best["draft_exit"],
            "k": best["k"],
            "speedup_over_predicted": best["speedup_over_predicted"],
            "median_speedup": statistics.median(r["speedup"] for r in spec["rows"]),
            "dim": row["dim"],
            "layers": row["layers"],
            "source": "benchmarks/width_grid.py",
        }
    )
    results.setdefault("generation", {}).update(
        {
            "speedup_over_theoretical_b1": g["b1"]["speedup_over_theoretical"],
            "speedup_b1": g["b1"]["speedup"],
            "theoretical_speedup_b1": g["b1"]["theoretical_speedup"],
            "speedup_b8_over_full": g["b8"]["speedup"],
            "speedup_b32_over_full": g["b32"]["speedup"],
            "early_exit_fraction_b8": g["b8"]["early_exit_fraction"],
            "width_grid_dim": row["dim"],
            "width_grid_source": "benchmarks/width_grid.py",
        }
    )
    path.write_text(json.dumps(results, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dims", default="512,256,1024", help="comma-separated widths, run in this order")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--chars", type=int, default=200_000, help="training characters (data.max_chars)")
    parser.add_argument("--chars-1024", type=int, default=80_000, help="training characters at dim 1024 and up")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "width_grid.json")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results.json")
    parser.add_argument("--no-merge", action="store_true", help="leave results.json alone")
    parser.add_argument("--quick", action="store_true", help="few tokens and prompts: a smoke run")
    args = parser.parse_args(argv)
    args.dims = [int(d) for d in args.dims.split(",")]
    if args.device.startswith("cuda") and not args.out.name.startswith("gpu"):
        args.out = args.out.with_name("gpu_results.json")  # CPU and CUDA figures never share a file
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/width_grid.py " + " ".join(sys.argv[1:] if argv is None else argv)
    chars = {d: args.chars_1024 if d >= 1024 else args.chars for d in args.dims}
    result: dict[str, Any] = {
        "setting": f"dims {args.dims}, {args.layers} layers, 8 heads, vocab 2000, deep supervision, "
        f"{args.epochs} epoch(s) of WikiText-2 ({chars} chars by dim); device {args.device}; decoding one "
        f"intra-op thread, fused decoder, propagate mode, exit at layer {EXIT}",
        "device": args.device,
        "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "machine": machine(),
        "rows": [],
    }
    t0 = time.perf_counter()
    for dim in args.dims:
        row = grid_row(dim, args.layers, args.epochs, chars[dim], args.device, args.quick)
        result["rows"].append(row)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write(result, args.out, command)
        if dim == 512 and args.device == "cpu" and not args.quick and not args.no_merge:
            merge_results(row, args.results)


if __name__ == "__main__":
    main()
