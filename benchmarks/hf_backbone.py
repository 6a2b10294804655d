"""The Hugging Face backbone against the native model: training tokens/s at equal sizes, and the early-exit
generation speedup on the HF backbone.

    python benchmarks/hf_backbone.py           # writes benchmarks/hf_backbone.json and benchmarks/hf_backbone.md
    python benchmarks/hf_backbone.py --quick   # a smoke run: fewer steps, batch 8 at dim 512, noisier figures

Training: the library's own step (`Trainer.train_epoch`, AdamW from `Trainer.create_optimizer`) over fixed
random batches, on the native `EarlyExitTransformer` and on an HF Llama of the same shape (vocab 1000, 4 layers,
plain multi-head attention, SwiGLU of the same width, untied head, sdpa attention), for the standard loss
(last layer only) and deep supervision (uniform over the 4 layers), at dim 64 (per-operation overhead
dominates) and dim 512 (arithmetic dominates), sequences of 64, batches of 32. The two models' steps are
interleaved one by one (so a change in the machine's load hits both alike) and tokens/s is batch tokens / the
median step time, as in benchmarks/training.py. Target: HF tokens/s >= 0.8x native, per configuration.

Generation: an untrained HF Llama with its lm_head scaled up (peaky confidences, as benchmarks/decoders.py does
with the native head), exit at layer 1, 64 greedy tokens after an 8-token prompt, batch 1, the reference
decoder (the HF backbone has no fused path) in propagate mode, against the same decoder at full depth
(threshold 0). The threshold starts at the median layer-1 max-prob confidence of a forward over a random
prompt batch; greedy trajectories of an untrained model are degenerate loops, so that median can land far
from "half the tokens exit", and the threshold is then bisected on the decode itself until about half the
generated tokens exit at layer 1 (both thresholds and their shares are recorded). One thread throughout;
the load average is recorded (the CPU may be shared). For context, the native model of the same shape is timed
at full depth with both of its decoders (reference and fused) on the same prompt.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # from_config builds locally; never reach for the hub

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from ease import EarlyExitTransformer, hf  # noqa: E402
from ease.config import TrainingConfig  # noqa: E402
from ease.inference.generation import SamplingConfig, decode  # noqa: E402
from ease.model.ffn import swiglu_hidden_dim  # noqa: E402
from ease.routing import max_prob  # noqa: E402
from ease.training import Trainer  # noqa: E402

OUT = Path(__file__).resolve().parent
VOCAB, LAYERS, SEQ, LR = 1000, 4, 64, 1e-3
METHODS = {"standard": {LAYERS: 1.0}, "deep_supervision": {layer: 1.0 / LAYERS for layer in range(1, LAYERS + 1)}}
PROMPT_LEN, NEW_TOKENS, HEAD_SCALE = 8, 64, 40.0
TARGET = 0.8


def heads_of(dim: int) -> int:
    return max(4, dim // 64)  # head dim 16 at dim 64 (the seeds' 4 heads), 64 at dim 512


def models(dim: int) -> tuple[EarlyExitTransformer, hf.HFBackbone]:
    """The native model and an HF Llama of the same shape, each built from seed 0."""
    heads, hidden = heads_of(dim), swiglu_hidden_dim(dim)  # the native default SwiGLU width, given to both
    torch.manual_seed(0)
    native = EarlyExitTransformer(VOCAB, dim, LAYERS, num_heads=heads, hidden_dim=hidden, tie_weights=False)
    torch.manual_seed(0)
    llama = hf.from_config(
        "llama", attn_implementation="sdpa", vocab_size=VOCAB, hidden_size=dim, num_hidden_layers=LAYERS,
        num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=hidden,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    return native, llama


def random_batches(n: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed random (x, y) batches, y = x shifted by one (tests/conftest.py's random_batches)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=g)
        out.append((x[:, :-1], x[:, 1:]))
    return out


def training_pair(dim: int, batch: int, method: str, warmup: int, steps: int) -> dict[str, Any]:
    """Native vs HF training steps on the same batches, interleaved step by step (ABBA order)."""
    weights = METHODS[method]
    data = random_batches(warmup + steps, batch)
    native, llama = models(dim)
    runs = {}
    for name, model in (("native", native), ("hf", llama)):
        trainer = Trainer(TrainingConfig(layer_weights=weights), VOCAB)
        runs[name] = (model, trainer, trainer.create_optimizer(model, LR), [])
    load_before = os.getloadavg()[0]
    for name in runs:  # warm-up steps: first-call allocation, AdamW state
        model, trainer, optimizer, _ = runs[name]
        trainer.train_epoch(model, data[:warmup], optimizer)
    for step, batch_xy in enumerate(data[warmup:]):
        order = ("native", "hf") if step % 2 == 0 else ("hf", "native")
        for name in order:
            model, trainer, optimizer, times = runs[name]
            start = time.perf_counter()
            trainer.train_epoch(model, [batch_xy], optimizer)  # one step per call: each step timed alone
            times.append(time.perf_counter() - start)
    tokens = batch * SEQ
    record: dict[str, Any] = {"dim": dim, "batch": batch, "method": method, "steps": steps, "warmup": warmup}
    for name, (model, _, _, times) in runs.items():
        record[f"{name}_tokens_per_s"] = tokens / statistics.median(times)
        record[f"{name}_tokens_per_s_best_step"] = tokens / min(times)
        record[f"{name}_step_s"] = times
        record[f"{name}_parameters"] = model.num_parameters()
    record["hf_over_native"] = record["hf_tokens_per_s"] / record["native_tokens_per_s"]
    record["target_met"] = record["hf_over_native"] >= TARGET
    record["load_average"] = [load_before, os.getloadavg()[0]]
    return record


def exit_share(model: hf.HFBackbone, prompt: torch.Tensor, sampling: SamplingConfig, threshold: float) -> float:
    run = decode(model, prompt, sampling, exit_layer=1, routing_threshold=threshold)
    return (run.exit_layers == 1).double().mean().item()


def half_exit_threshold(model: hf.HFBackbone, prompt: torch.Tensor, sampling: SamplingConfig, iterations: int):
    """The forward-median threshold, then (when the decode's layer-1 share is not within 0.4-0.6) a bisection on
    the decode itself towards a share of one half. Returns (threshold, share, forward threshold, its share)."""
    with torch.no_grad():
        ids = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1))
        start = float(max_prob(model(ids, [1])[1]).median())
    start_share = exit_share(model, prompt, sampling, start)
    best = (abs(start_share - 0.5), start, start_share)
    lo, hi, t = 0.0, 1.0, start  # a higher threshold lets fewer tokens exit
    share = start_share
    for _ in range(iterations):
        if abs(best[0]) <= 0.1:
            break
        lo, hi = (t, hi) if share > 0.5 else (lo, t)
        t = (lo + hi) / 2
        share = exit_share(model, prompt, sampling, t)
        best = min(best, (abs(share - 0.5), t, share))
    return best[1], best[2], start, start_share


def generation(dim: int, repeats: int, iterations: int) -> dict[str, Any]:
    _, model = models(dim)
    model.eval()
    with torch.no_grad():
        model.hf.lm_head.weight.mul_(HEAD_SCALE)  # peaky: layer-1 confidences spread over (0, 1)
    prompt = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(2))
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, batch_size=1, kv_mode="propagate", decoder="reference")
    load_before = os.getloadavg()[0]
    threshold, share, forward_threshold, forward_share = half_exit_threshold(model, prompt, sampling, iterations)
    best = {"full": float("inf"), "early": float("inf")}
    runs = {}
    for _ in range(repeats):  # interleaved, best of `repeats` each (decoders.py's best-of)
        for label, t in (("full", 0.0), ("early", threshold)):
            runs[label] = decode(model, prompt, sampling, exit_layer=1, routing_threshold=t)
            best[label] = min(best[label], runs[label].seconds)
    layers = runs["early"].exit_layers.double().mean().item()
    full_tps, early_tps = NEW_TOKENS / best["full"], NEW_TOKENS / best["early"]
    native, _ = models(dim)  # context: the native model of the same shape at full depth, both decoders
    native_tps = {}
    for decoder in ("reference", "fused"):
        native_sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, batch_size=1, decoder=decoder)
        native_runs = [decode(native.eval(), prompt, native_sampling, routing_threshold=0.0) for _ in range(repeats)]
        native_tps[decoder] = NEW_TOKENS / min(run.seconds for run in native_runs)
    return {
        "dim": dim, "threshold": threshold, "layer1_share": share, "forward_median_threshold": forward_threshold,
        "forward_median_layer1_share": forward_share, "full_depth_tokens_per_s": full_tps,
        "early_exit_tokens_per_s": early_tps, "speedup": early_tps / full_tps, "mean_layers_per_token": layers,
        "compute_cost": layers / LAYERS, "theoretical_speedup": LAYERS / layers,
        "full_depth_mean_layers": runs["full"].exit_layers.double().mean().item(), "repeats": repeats,
        "native_full_depth_tokens_per_s": native_tps,
        "load_average": [load_before, os.getloadavg()[0]],
    }  # fmt: skip


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats, batch 8 at dim 512")
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    # (dim, batch, warmup, steps): dim 512 at batch 32 is ~2 s a step on one thread
    plan = ((64, 32, 2, 10), (512, 8, 1, 3)) if args.quick else ((64, 32, 3, 40), (512, 32, 1, 12))
    repeats, iterations = (2, 6) if args.quick else (5, 12)
    load_start = os.getloadavg()
    training = [
        training_pair(dim, batch, method, warm, steps) for dim, batch, warm, steps in plan for method in METHODS
    ]
    gen = [generation(dim, repeats, iterations) for dim in (64, 512)]
    worst = min(r["hf_over_native"] for r in training)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    command = "python benchmarks/hf_backbone.py" + (" --quick" if args.quick else "")
    settings = {
        "vocab_size": VOCAB, "num_layers": LAYERS, "seq_len": SEQ, "lr": LR, "threads": 1,
        "heads": {str(d): heads_of(d) for d in (64, 512)},
        "hidden_dim": {str(d): swiglu_hidden_dim(d) for d in (64, 512)},
        "training_plan": [dict(zip(("dim", "batch", "warmup", "steps"), p)) for p in plan],
        "layer_weights": {k: {str(layer): w for layer, w in v.items()} for k, v in METHODS.items()},
        "hf_model": "llama, num_key_value_heads = num_attention_heads, tie_word_embeddings=False, sdpa",
        "generation": {"prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "batch": 1, "greedy": True,
                       "exit_layer": 1, "kv_mode": "propagate", "decoder": "reference", "head_scale": HEAD_SCALE,
                       "repeats": repeats, "bisection_iterations": iterations},
        "tokens_per_s": "training: batch tokens / median step time (steps interleaved native/HF); "
                        "generation: 64 tokens / best of the repeats",
    }  # fmt: skip
    result = {
        "measured": stamp, "command": command, "quick": args.quick, "seconds": None,
        "machine": {**machine(), "transformers": transformers_version(), "load_average_start": list(load_start)},
        "settings": settings, "training": training, "generation": gen,
        "target": {"figure": "min HF/native training tokens/s", "value": worst, "target": TARGET,
                   "met": worst >= TARGET},
    }  # fmt: skip
    result["seconds"] = time.perf_counter() - began
    (OUT / "hf_backbone.json").write_text(json.dumps(result, indent=2) + "\n")

    train_rows = [
        [r["dim"], r["batch"], r["method"], f"{r['native_tokens_per_s']:.0f}", f"{r['hf_tokens_per_s']:.0f}",
         f"{r['hf_over_native']:.2f}", "pass" if r["target_met"] else "FAIL", r["native_parameters"],
         r["hf_parameters"]]
        for r in training
    ]  # fmt: skip
    train_table = tabulate(
        train_rows, tablefmt="github",
        headers=["dim", "batch", "loss", "native tok/s", "HF Llama tok/s", "HF/native", ">= 0.8x", "native params",
                 "HF params"],
    )  # fmt: skip
    gen_rows = [
        [g["dim"], f"{g['threshold']:.3f}", f"{g['layer1_share']:.2f}", f"{g['full_depth_tokens_per_s']:.0f}",
         f"{g['early_exit_tokens_per_s']:.0f}", f"{g['speedup']:.2f}", f"{g['mean_layers_per_token']:.2f}",
         f"{g['theoretical_speedup']:.2f}", f"{g['native_full_depth_tokens_per_s']['reference']:.0f}",
         f"{g['native_full_depth_tokens_per_s']['fused']:.0f}"]
        for g in gen
    ]  # fmt: skip
    gen_table = tabulate(
        gen_rows, tablefmt="github",
        headers=["dim", "threshold", "exit@1 share", "full depth tok/s", "early exit tok/s", "speedup",
                 "layers/token", "theoretical (1/cost)", "native ref. full tok/s", "native fused full tok/s"],
    )  # fmt: skip
    load = result["machine"]["load_average"]
    verdict = f"worst HF/native {worst:.2f}: target >= {TARGET}x {'met' if worst >= TARGET else 'NOT met'}"
    (OUT / "hf_backbone.md").write_text(
        f"# HF backbone vs native ({stamp}, `{command}`, 1 thread, load average {load[0]:.2f} at the end, "
        f"{load_start[0]:.2f} at the start; torch {torch.__version__}, transformers {transformers_version()})\n\n"
        f"## Training tokens/s (seq {SEQ}, {LAYERS} layers, vocab {VOCAB}, median step, steps interleaved)\n\n"
        f"{train_table}\n\n{verdict}.\n\n"
        f"## Early-exit generation on the HF Llama (batch 1, {PROMPT_LEN}-token prompt, {NEW_TOKENS} greedy "
        "tokens, reference decoder, propagate)\n\n"
        f"{gen_table}\n"
    )
    print(train_table, verdict, gen_table, f"load average {load}; {result['seconds']:.0f} s", sep="\n\n")


if __name__ == "__main__":
    main()
