"""EASE speed benchmark: one command, every figure measured on this machine.

    python benchmarks/run.py              # the full run (5-10 minutes; includes torch.compile)
    python benchmarks/run.py --quick      # fewer steps and tokens, no torch.compile (about a minute)
    python benchmarks/run.py --threads 2  # two intra-op threads for training/evaluation (quiet machine only)

Writes benchmarks/results.json and benchmarks/results.md and prints the tables:
  (a) training tokens/s, standard vs deep supervision vs asymmetric, at the seeds' size (vocab 1000, dim 64,
      3 layers, seq 64, batch 32) and 4x wider (dim 256), time ratios beside analytic FLOP ratios;
  (b) threshold analysis with K=1 vs K=10 thresholds; routed evaluation, counted vs really skipping;
  (c) generation tokens/s and speedup over full depth at ~30/50/70% early exits, batch 1 and 8, beside the
      theoretical 1/compute_cost;
  (d) peak training memory per configuration;
  (e) torch.compile in training and decoding (full run, or --compile);
  (f) the standard-LM training step against nanoGPT's (re-implemented in benchmarks/nanogpt.py), interleaved
      in one process per width: training.over_nanogpt_dim64 / _dim256 (target >= 1.0), and the native model
      with nanoGPT's architecture against it: training.over_nanogpt_same_arch_dim64 / _dim256.
The three target figures are checked and reported as measured (never clamped):
  generation.speedup_over_theoretical_b1 >= 0.8, training.deep_supervision_time_over_flop_ratio <= 1.1,
  evaluation.threshold_k10_over_k1 <= 1.2.
On a shared CPU every wall time moves with the load: the load average is recorded with the results.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/run.py` puts benchmarks/ first on the path, not the repo
    sys.path.insert(0, str(REPO))
# Inductor compiles in worker processes that can outlive the compile call and steal the timed code's CPU.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from benchmarks.common import SEED_SIZE, benchmark_data, machine, run_worker  # noqa: E402
from benchmarks.evaluation import run_routed_eval, run_threshold_cost  # noqa: E402
from benchmarks.flops import check_against_torch  # noqa: E402
from benchmarks.generation import run_generation, train_brief  # noqa: E402
from benchmarks.torch_compile import (  # noqa: E402
    run_decode_compile,
    run_static_block_compile,
    run_training_compile,
)
from benchmarks.training import METHODS  # noqa: E402

OUT_DIR = REPO / "benchmarks"
WIDE = 4 * SEED_SIZE["dim"]
TARGETS = (
    ("generation.speedup_over_theoretical_b1", ">=", 0.8),
    ("training.deep_supervision_time_over_flop_ratio", "<=", 1.1),
    ("evaluation.threshold_k10_over_k1", "<=", 1.2),
    ("training.over_nanogpt_dim64", ">=", 1.0),
    ("training.over_nanogpt_dim256", ">=", 1.0),
)


def run_training(steps: int, warmup: int, threads: int | None) -> dict[str, Any]:
    """(a) and (d): one fresh process per (method, width)."""
    base = {**SEED_SIZE, "steps": steps, "warmup": warmup, "threads": threads}
    rows, by_key = [], {}
    for dim in (SEED_SIZE["dim"], WIDE):
        for method in METHODS:
            print(f"  training: {method}, dim {dim}", flush=True)
            row = run_worker("training", {**base, "method": method, "dim": dim})
            by_key[(method, dim)] = row
            rows.append(row)
    for row in rows:
        std = by_key[("standard", row["dim"])]
        row["time_ratio"] = std["tokens_per_s"] / row["tokens_per_s"]  # time per token vs standard
        row["flop_ratio"] = row["flops_per_token"] / std["flops_per_token"]
        row["time_over_flop_ratio"] = row["time_ratio"] / row["flop_ratio"]
        row["achieved_gflops"] = row["tokens_per_s"] * row["flops_per_token"] / 1e9
    ds = by_key[("deep_supervision", SEED_SIZE["dim"])]
    s = SEED_SIZE
    nanogpt = []
    for dim in (SEED_SIZE["dim"], WIDE):  # (f): one process per width, the three series interleaved in it
        print(f"  training: EASE vs nanoGPT, dim {dim}", flush=True)
        chunks, per_chunk = (4, 5) if steps < 30 else ((8, 10) if dim == SEED_SIZE["dim"] else (6, 5))
        nanogpt.append(run_worker("nanogpt", {"dim": dim, "chunks": chunks, "steps": per_chunk, "threads": threads}))
    return {
        "rows": rows,
        "nanogpt": nanogpt,
        **{f"over_nanogpt_dim{r['dim']}": r["ratio"] for r in nanogpt},
        **{f"over_nanogpt_dim{r['dim']}_fused_adamw": r["ratio_fused_adamw"] for r in nanogpt},
        **{f"over_nanogpt_same_arch_dim{r['dim']}": r["ratio_same_arch"] for r in nanogpt},
        "flop_check": check_against_torch(s["dim"], s["num_layers"], s["vocab_size"], s["seq_len"], heads=3),
        "deep_supervision_time_over_flop_ratio": ds["time_over_flop_ratio"],
        "deep_supervision_time_over_flop_ratio_wide": by_key[("deep_supervision", WIDE)]["time_over_flop_ratio"],
        "asymmetric_time_over_flop_ratio": by_key[("asymmetric", SEED_SIZE["dim"])]["time_over_flop_ratio"],
        "_by_key": by_key,
        "base": base,
    }


def lookup(results: dict[str, Any], dotted: str) -> float | None:
    node: Any = results
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, op, target in TARGETS:
        value = lookup(results, name)
        hit = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"figure": name, "value": value, "target": f"{op} {target}", "hit": hit})
    return out


# --- tables ------------------------------------------------------------------------------------------------


def tables(results: dict[str, Any]) -> list[tuple[str, str, list[list[Any]], list[str]]]:
    """(key, title, rows, headers) for every section that ran."""
    out = []
    tr = results.get("training")
    if tr:
        rows = [
            [r["method"], r["dim"], r["weighted_exits"], r["tokens_per_s"], r["time_ratio"], r["flop_ratio"],
             r["time_over_flop_ratio"], r["achieved_gflops"]]
            for r in tr["rows"]
        ]  # fmt: skip
        out.append(
            ("training", "(a) Training throughput (time and FLOP ratios vs standard at the same width)", rows,
             ["method", "dim", "heads", "tokens/s", "time ratio", "FLOP ratio", "time/FLOP", "GFLOP/s"])
        )  # fmt: skip
        if tr.get("nanogpt"):
            rows = [
                [r["dim"], r["ease_tokens_per_s"], r["ease_fused_adamw_tokens_per_s"],
                 r.get("ease_same_arch_tokens_per_s"), r["nanogpt_tokens_per_s"], r["ratio"], r["ratio_fused_adamw"],
                 r.get("ratio_same_arch"), r["ease_parameters"], r["nanogpt_parameters"]]
                for r in tr["nanogpt"]
            ]  # fmt: skip
            out.append(("nanogpt", "(f) Standard-LM training step vs nanoGPT (interleaved, median chunk)", rows,
                        ["dim", "EASE tokens/s", "EASE + fused AdamW", "EASE, nanoGPT's arch", "nanoGPT tokens/s",
                         "EASE/nanoGPT", "with fused AdamW", "same arch/nanoGPT", "EASE params",
                         "nanoGPT params"]))  # fmt: skip
        mem = [[r["method"], r["dim"], r["train_peak_mb"], r["peak_rss_mb"]] for r in tr["rows"]]
        out.append(("memory", "(d) Peak training memory (resident set)", mem,
                    ["method", "dim", "training peak (MB above setup)", "process peak RSS (MB)"]))  # fmt: skip
    ev = results.get("evaluation")
    if ev:
        rows = [["K=1", ev["threshold_k1_s"]], ["K=10", ev["threshold_k10_s"]], ["K10/K1", ev["threshold_k10_over_k1"]]]
        out.append(("threshold", "(b) Threshold analysis cost (one evaluation pass, K thresholds scored)", rows,
                    ["thresholds", "seconds (ratio in the last row)"]))  # fmt: skip
        routed = ev.get("routed")
        if routed:
            rows = [
                [r["setting"], r["threshold"], r["ppl"], r["acc"], r["shallow_ratio"], r["compute_cost"],
                 r["layer_fraction"], r["kv_fraction"], r["heads_per_token"], r["flops_over_full_depth"],
                 r["time_s"], r["time_over_full_depth"]]
                for r in routed["rows"]
            ]  # fmt: skip
            out.append(("routed_eval", "(b') Routed evaluation of the validation split: counted vs skipping", rows,
                        ["setting", "threshold", "PPL", "acc", "shallow", "compute_cost", "blocks run",
                         "K/V only", "heads/token", "FLOPs/full", "seconds", "time/full"]))  # fmt: skip
    gen = results.get("generation")
    if gen:
        rows = [
            [r["target_early_fraction"], r["batch_size"], r["kv_mode"], r["threshold"], r["early_exit_fraction"],
             r["compute_cost"], r["tokens_per_s"], r["full_depth_tokens_per_s"], r["speedup"],
             r["theoretical_speedup"], r["speedup_over_theoretical"], r["flop_speedup"]]
            for r in gen["rows"]
        ]  # fmt: skip
        out.append(("generation", "(c) Generation with early exit vs full depth (same KV-cache code)", rows,
                    ["target early", "batch", "kv_mode", "threshold", "early exits", "compute_cost", "tokens/s",
                     "full-depth tokens/s", "speedup", "1/compute_cost", "speedup/theoretical",
                     "FLOP speedup"]))  # fmt: skip
    comp = results.get("compile")
    if comp:
        rows = [
            [f"train {r['method']} dim {r['dim']}", r.get("eager_tokens_per_s"), r.get("compiled_tokens_per_s"),
             r.get("speedup"), r.get("compile_warmup_s"), r.get("error")]
            for r in comp["training"]
        ]  # fmt: skip
        rows += [
            [f"decode b1 ({r['setting']})", comp["decode"][0].get("tokens_per_s"), r.get("tokens_per_s"),
             r.get("speedup"), r.get("first_run_s"), r.get("error")]
            for r in comp["decode"][1:]
        ]  # fmt: skip
        block = comp.get("decode_static_block")
        if block:
            rows.append(
                [
                    "decode block, static shapes (us/call)",
                    block.get("decoder_eager_us"),
                    block.get("compiled_us"),
                    block.get("speedup"),
                    block.get("first_run_s"),
                    block.get("error"),
                ]
            )
        out.append(("compile", "(e) torch.compile on CPU (tokens/s; the last row in microseconds per call)", rows,
                    ["what", "eager", "compiled", "speedup", "first-run s", "error"]))  # fmt: skip
    targets = results.get("targets")
    if targets:
        rows = [[t["figure"], t["value"], t["target"], {True: "hit", False: "MISS", None: "not run"}[t["hit"]]]
                for t in targets]  # fmt: skip
        out.append(("targets", "Targets", rows, ["figure", "measured", "target", "result"]))
    return out


def render(results: dict[str, Any], fmt: str) -> str:
    parts = []
    for _, title, rows, headers in tables(results):
        table = tabulate(rows, headers=headers, tablefmt=fmt, floatfmt=".3g", missingval="")
        parts.append(f"### {title}\n\n{table}\n" if fmt == "github" else f"{title}\n{table}\n")
    return "\n".join(parts)


def _loads(values: list[float] | None) -> str:
    return "n/a" if not values else "/".join(f"{v:.1f}" for v in values)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    one_minute = [(loads or [0])[0] for loads in (m["load_average"], m["load_average_end"])]
    busy = max(one_minute) > m["cpu_count"]
    head = [
        "# EASE speed benchmark",
        "",
        f"Command: `{results['command']}`. Measured {results['started']} in {results['duration_s']:.0f} s on "
        f"{m['cpu_count']} CPU cores, torch {m['torch']}, {m['threads']} intra-op thread(s) for training and "
        f"evaluation, one for decoding. Load average (1, 5, 15 min) {_loads(m['load_average'])} at the start, "
        f"{_loads(m['load_average_end'])} at the end"
        + (": above the core count, so other processes shared the CPU and timings are noisy." if busy else "."),
        "",
        "Mode: " + ("quick (fewer steps and tokens: noisier)" if results["quick"] else "full"),
        "",
    ]
    return "\n".join(head) + "\n" + render(results, "github")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps/tokens/repeats; no torch.compile")
    parser.add_argument("--compile", action="store_true", help="run the torch.compile section in --quick too")
    parser.add_argument("--sections", default="training,evaluation,generation,compile",
                        help="comma-separated subset of training,evaluation,generation,compile")  # fmt: skip
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder for results.json and results.md")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for training and evaluation (default 1; decoding is always 1). On a "
                        "CPU shared with other jobs, 2 threads made timings swing tenfold: a step waits for a "
                        "descheduled thread. Use --threads 2 on a quiet machine for two-core throughput.")  # fmt: skip
    args = parser.parse_args(argv)
    host = machine()  # before the thread setting, so it records torch's default
    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    if args.quick and not args.compile:
        sections.discard("compile")
    q = args.quick
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python benchmarks/run.py" + (" --quick" if q else ""),
        "quick": q,
        "started": started,
        "machine": host,
    }
    eager_training = None
    if "training" in sections:
        print("(a)/(d) training throughput and memory ...", flush=True)
        training = run_training(steps=12 if q else 30, warmup=2 if q else 3, threads=args.threads)
        eager_training = training.pop("_by_key")
        results["training"] = training
    model = data = None
    if sections & {"evaluation", "generation", "compile"}:
        s = SEED_SIZE
        data = benchmark_data(s["seq_len"], s["batch_size"], s["vocab_size"])
        print(f"training a model briefly for (b)/(c) on {data.source} ...", flush=True)
        model = train_brief(data, s["dim"], s["num_layers"], s["num_heads"], epochs=2 if q else 4)
        results["generation_model"] = {**s, "vocab_size": data.vocab_size, "epochs": 2 if q else 4,
                                       "method": "deep_supervision", "data": data.source}  # fmt: skip
    if "evaluation" in sections:
        print("(b) threshold analysis and routed evaluation ...", flush=True)
        with torch.no_grad():
            results["evaluation"] = {
                **run_threshold_cost(model, data, repeats=3 if q else 5),
                "routed": run_routed_eval(model, data, repeats=2 if q else 3),
            }
    if "generation" in sections:
        print("(c) generation ...", flush=True)
        results["generation"] = run_generation(
            model, data, tokens=96 if q else 256, repeats=3 if q else 7, calibration_tokens=96 if q else 256
        )
    if "compile" in sections:
        print("(e) torch.compile ...", flush=True)
        base = {**SEED_SIZE, "steps": 12 if q else 30, "warmup": 2 if q else 3, "threads": args.threads}
        if eager_training is None:
            eager_training = {(m, d): run_worker("training", {**base, "method": m, "dim": d})
                              for d in (SEED_SIZE["dim"], WIDE) for m in ("standard", "deep_supervision")}  # fmt: skip
        results["compile"] = {
            "training": run_training_compile(base, eager_training),
            "decode": run_decode_compile(model, tokens=96 if q else 256),
            "decode_static_block": run_static_block_compile(model),
        }
    results["targets"] = check_targets(results)
    results["duration_s"] = time.perf_counter() - t0
    results["machine"]["load_average_end"] = machine()["load_average"]
    results["machine"]["threads"] = torch.get_num_threads()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    print()
    print(render(results, "simple"))
    print(f"written: {args.out / 'results.json'}, {args.out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
