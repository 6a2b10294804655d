"""Batched early-exit decoding with the fused decoder: early exit vs full depth at batch 1/8/32, and where time goes.

    python benchmarks/batched_exit.py                      # dim 512, 8 layers; writes benchmarks/batched_exit.json
    python benchmarks/batched_exit.py --profile 8          # also torch.profiler's top ops at batch 8
    git show 33055e3:ease/inference/fused.py > /tmp/fused_old.py
    python benchmarks/batched_exit.py --baseline /tmp/fused_old.py   # also an older FusedDecoder, same runs

An untrained native model (vocabulary 2000, 8 heads) with its head scaled up (peaky confidences, as
benchmarks/routed_eval_width.py does), exit at layer 1, the threshold the median layer-1 max-prob of the prompts'
positions, so about half the tokens exit. 16-token prompts, 64 greedy tokens, one intra-op thread. Each time is the
minimum of 3 rounds, the decoders alternating within a round. No training, so it runs in a minute or two: the
trained grid is benchmarks/width_grid.py.
"""

import argparse
import contextlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from ease import EarlyExitTransformer  # noqa: E402
from ease.inference.fused import FusedDecoder  # noqa: E402
from ease.routing import max_prob  # noqa: E402

V, EXIT, PROMPT, TOKENS = 2000, 1, 16, 64
CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}  # cpu: the decoding thread's CPU time (shared machines)
clock = CLOCK["wall"]


def decode(
    cls: type, model: EarlyExitTransformer, prompt: torch.Tensor, threshold: float, around: Any = None
) -> tuple[float, float]:
    """Seconds for TOKENS greedy steps after the prefill, and the mean exit layer. around: a context manager
    (a profiler) entered around the steps only."""
    B = prompt.shape[0]
    dec = cls(model, B, PROMPT + TOKENS, exit_layer=EXIT, routing_threshold=threshold)
    dec.prefill(prompt[:, :-1])
    token, exits = prompt[:, -1], []
    with torch.inference_mode(), around or contextlib.nullcontext():
        start = clock()
        for _ in range(TOKENS):
            out = dec.step(token)
            token = out.logits.argmax(-1)
            exits.append(out.exit_layer.clone())
        seconds = clock() - start
    return seconds, torch.stack(exits).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", type=int, default=None, help="batch size to profile (torch.profiler)")
    parser.add_argument("--baseline", type=Path, default=None, help="an older ease/inference/fused.py to compare")
    parser.add_argument("--clock", choices=sorted(CLOCK), default="wall")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "batched_exit.json")
    args = parser.parse_args()
    global clock
    clock = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    L = args.layers
    model = EarlyExitTransformer(V, args.dim, L, num_heads=8).eval()
    with torch.no_grad():
        model.output_head.weight.mul_(30.0)
    prompts = torch.randint(0, V, (32, PROMPT))
    with torch.inference_mode():
        threshold = max_prob(model.unembed(model.layer(1, model.embed(prompts)))).flatten().median().item()
    decoders: dict[str, type] = {"fused": FusedDecoder}
    if args.baseline is not None:
        spec = importlib.util.spec_from_file_location("fused_baseline", args.baseline)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        decoders["baseline"] = module.FusedDecoder
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        prompt = prompts[:B]
        best: dict[str, float] = {}
        cost = 0.0
        for r in range(4):  # round 0 warms up
            for name, cls in decoders.items():
                for mode, t in (("early", threshold), ("full", 0.0)):
                    seconds, mean_exit = decode(cls, model, prompt, t)
                    if r:
                        best[f"{name}_{mode}"] = min(best.get(f"{name}_{mode}", float("inf")), seconds)
                    if name == "fused" and mode == "early":
                        cost = mean_exit / L
        row: dict[str, Any] = {"batch": B, "compute_cost": round(cost, 3)}
        row["theoretical"] = round(1 / cost, 3)
        for name in decoders:
            full, early = best[f"{name}_full"], best[f"{name}_early"]
            row[f"{name}_ms_per_step_full"] = round(1e3 * full / TOKENS, 2)
            row[f"{name}_ms_per_step_early"] = round(1e3 * early / TOKENS, 2)
            row[f"{name}_speedup"] = round(full / early, 3)
            row[f"{name}_over_theoretical"] = round(full / early * cost, 3)
        rows.append(row)
        print(row, flush=True)
    result: dict[str, Any] = {
        "setting": f"untrained dim {args.dim}, {L} layers, vocab {V}, head x30, exit at layer {EXIT} at the median "
        f"confidence, {PROMPT}-token prompts, {TOKENS} greedy tokens, {args.threads} thread(s), {args.clock} clock",
        "machine": machine(),
        "rows": rows,
    }
    if args.profile is not None:
        from torch.profiler import ProfilerActivity, profile

        prompt = prompts[: args.profile]
        result["profile"] = {}
        for mode, t in (("early", threshold), ("full", 0.0)):
            decode(FusedDecoder, model, prompt, t)
            prof = profile(activities=[ProfilerActivity.CPU])
            decode(FusedDecoder, model, prompt, t, prof)
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
            result["profile"][mode] = {
                "total_ms": round(total / 1e3, 1),
                "top": [[e.key, e.count, round(e.self_cpu_time_total / 1e3, 1)] for e in top],
            }
            print(mode, json.dumps(result["profile"][mode]), flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
