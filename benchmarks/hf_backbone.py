"""The Hugging Face backbone against the native model: training tokens/s at equal sizes, and early-exit
generation speedup on the HF backbone.

    python benchmarks/hf_backbone.py           # writes benchmarks/hf_backbone.json and benchmarks/hf_backbone.md
    python benchmarks/hf_backbone.py --quick   # fewer steps (a smoke run; the figures are noisier)

Training: the library's own step (`Trainer.train_epoch` over fixed random batches, AdamW) on the native
`EarlyExitTransformer` and on an HF Llama of the same shape (vocab 1000, 4 layers, plain multi-head attention,
SwiGLU of the same width, untied head), for the standard loss (last layer) and deep supervision (every
layer), at dim 64 (per-operation overhead dominates) and dim 512 (arithmetic matters). Target: the HF backbone
at >= 0.8x the native tokens/s. Generation: an HF Llama with a scaled-up head (peaky confidences), threshold at
the median layer-1 confidence, 64 greedy tokens after an 8-token prompt, batch 1, the reference decoder in
propagate mode, against the same decoder at full depth. One thread; the load average is recorded.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
VOCAB, LAYERS, SEQ = 1000, 4, 64
METHODS = {"standard": {LAYERS: 1.0}, "deep_supervision": {layer: 1.0 / LAYERS for layer in range(1, LAYERS + 1)}}


def models(dim: int) -> tuple[EarlyExitTransformer, hf.HFBackbone]:
    heads = max(4, dim // 64)
    hidden = swiglu_hidden_dim(dim)  # the native default, given to both
    torch.manual_seed(0)
    native = EarlyExitTransformer(VOCAB, dim, LAYERS, num_heads=heads, hidden_dim=hidden)
    llama = hf.from_config(
        "llama", vocab_size=VOCAB, hidden_size=dim, num_hidden_layers=LAYERS, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=hidden, max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    return native, llama


def batches(n: int, batch: int) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=g)
        out.append((x[:, :-1], x[:, 1:]))
    return out


def train_tokens_per_s(model, weights: dict[int, float], data: list, warmup: int, repeats: int) -> float:
    trainer = Trainer(TrainingConfig(layer_weights=weights), VOCAB)
    optimizer = trainer.create_optimizer(model, 1e-3)
    trainer.train_epoch(model, data[:warmup], optimizer, 0)
    best = float("inf")
    for epoch in range(repeats):  # best of several epochs: the least disturbed by other load
        t0 = time.perf_counter()
        trainer.train_epoch(model, data[warmup:], optimizer, epoch + 1)
        best = min(best, time.perf_counter() - t0)
    return sum(x.numel() for x, _ in data[warmup:]) / best


def generation(dim: int, repeats: int) -> dict:
    _, model = models(dim)
    model.eval()
    with torch.no_grad():
        model.hf.lm_head.weight.mul_(40.0)  # peaky: confidences spread over (0, 1)
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    sampling = SamplingConfig(max_new_tokens=64, decoder="reference")
    # The threshold: the median layer-1 confidence over the full-depth continuation, so about half exit.
    full = decode(model, prompt, sampling, exit_layer=1, routing_threshold=0.0)
    with torch.no_grad():
        seq = torch.cat([prompt, full.tokens.view(1, -1)], dim=1)
        threshold = float(max_prob(model(seq, [1])[1][:, 8:]).median())
    out = {}
    for label, t in (("full", 0.0), ("early", threshold)):
        best, run = float("inf"), None
        for _ in range(repeats):
            run = decode(model, prompt, sampling, exit_layer=1, routing_threshold=t)
            best = min(best, run.seconds)
        out[label] = {"tokens_per_s": 64 / best, "mean_layers": run.exit_layers.double().mean().item()}
    layers = out["early"]["mean_layers"]
    return {
        "dim": dim, "threshold": threshold, "full_depth_tokens_per_s": out["full"]["tokens_per_s"],
        "early_exit_tokens_per_s": out["early"]["tokens_per_s"], "mean_layers_per_token": layers,
        "speedup": out["early"]["tokens_per_s"] / out["full"]["tokens_per_s"], "theoretical_speedup": LAYERS / layers,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, repeats = (4, 2) if args.quick else (20, 5)
    training, rows = [], []
    for dim, batch in ((64, 32), (512, 8)):
        data = batches(steps + 2, batch)
        for method, weights in METHODS.items():
            native, llama = models(dim)
            n_tps = train_tokens_per_s(native, weights, data, 2, repeats)
            h_tps = train_tokens_per_s(llama, weights, data, 2, repeats)
            record = {
                "dim": dim, "batch": batch, "method": method, "native_tokens_per_s": n_tps, "hf_tokens_per_s": h_tps,
                "hf_over_native": h_tps / n_tps, "native_parameters": native.num_parameters(),
                "hf_parameters": llama.num_parameters(),
            }  # fmt: skip
            training.append(record)
            rows.append([dim, batch, method, f"{n_tps:.0f}", f"{h_tps:.0f}", f"{h_tps / n_tps:.2f}",
                         record["native_parameters"], record["hf_parameters"]])  # fmt: skip
    worst = min(r["hf_over_native"] for r in training)
    gen = [generation(dim, repeats) for dim in (64, 512)]
    stamp = time.strftime("%Y-%m-%d %H:%M")
    result = {
        "measured": stamp, "quick": args.quick, "machine": {**machine(), "transformers": hf_version()},
        "training": training, "generation": gen,
        "target": {"figure": "min hf_over_native", "value": worst, "target": 0.8, "met": worst >= 0.8},
    }  # fmt: skip
    (OUT / "hf_backbone.json").write_text(json.dumps(result, indent=2) + "\n")
    train_table = tabulate(
        rows, headers=["dim", "batch", "loss", "native tok/s", "HF Llama tok/s", "HF/native", "native params",
                       "HF params"], tablefmt="github",
    )  # fmt: skip
    gen_table = tabulate(
        [[g["dim"], f"{g['full_depth_tokens_per_s']:.0f}", f"{g['early_exit_tokens_per_s']:.0f}",
          f"{g['mean_layers_per_token']:.2f}", f"{g['speedup']:.2f}", f"{g['theoretical_speedup']:.2f}"] for g in gen],
        headers=["dim", "full depth tok/s", "early exit tok/s", "layers/token", "speedup", "theoretical"],
        tablefmt="github",
    )  # fmt: skip
    load = result["machine"]["load_average"]
    (OUT / "hf_backbone.md").write_text(
        f"# HF backbone vs native ({stamp}, `python benchmarks/hf_backbone.py{' --quick' if args.quick else ''}`, "
        f"1 thread, load average {load[0]:.2f})\n\n## Training (seq {SEQ}, {LAYERS} layers, vocab {VOCAB})\n\n"
        f"{train_table}\n\nTarget HF/native >= 0.8: worst {worst:.2f} ({'met' if worst >= 0.8 else 'NOT met'}).\n\n"
        f"## Early-exit generation on the HF Llama (batch 1, 64 tokens, propagate)\n\n{gen_table}\n"
    )
    print(train_table, gen_table, f"worst HF/native {worst:.2f}", sep="\n\n")


def hf_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    main()
