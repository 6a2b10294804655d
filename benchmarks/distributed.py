"""Data-parallel throughput: `torchrun --nproc_per_node=N train.py` against one process, same global batch.

    python benchmarks/distributed.py                  # CPU: 1 process (2 threads) vs 2 processes (1 thread each)
    python benchmarks/distributed.py --gpu --nproc 8  # a GPU machine: ~100M-parameter model in bf16, tokens/s and MFU

Each configuration is one `train.py` run by steps on WikiText-2 (synthetic tokens where it is missing); the
figure is the median of the per-evaluation-interval tokens/s in its metrics.json (the first interval, which
holds start-up, is left out). MFU = achieved FLOP/s ÷ the GPU's peak, with 6·N FLOPs per trained token
(N: non-embedding parameters) plus attention's 12·L·d·T. Writes benchmarks/distributed.json/.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s per GPU


def run(nproc: int, threads: int, args: list[str], folder: Path) -> dict[str, Any]:
    train = [str(REPO / "train.py"), *args, f"threads={threads}", f"hydra.run.dir={folder}", "progress=false"]
    if nproc == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    shared = REPO.parent / "shared" / "data" / "wikitext-2"
    if "EASE_DATA_DIR" not in env and shared.is_dir():
        env["EASE_DATA_DIR"] = str(shared)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
    rates = [row["tokens_per_s"] for row in metrics["history"][1:]] or [metrics["history"][0]["tokens_per_s"]]
    return {
        "nproc": nproc,
        "threads": threads,
        "tokens_per_s": statistics.median(rates),
        "num_parameters": metrics["num_parameters"],
        "val_ppl": metrics["ppl"],
    }


def flops_per_token(params: int, layers: int, dim: int, seq_len: int, vocab: int) -> float:
    non_embedding = params - vocab * dim
    return 6 * non_embedding + 12 * layers * dim * seq_len


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="GPU machine: ~100M parameters, bf16, nccl")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--gpu-name", default="H200", choices=sorted(PEAK_BF16))
    args = parser.parse_args(argv)
    if args.gpu:  # 12 layers, dim 768: GPT-2 small's shape (~85M non-embedding parameters)
        size = {"num_layers": 12, "dim": 768, "num_heads": 12, "seq_len": 512, "vocab": 8000, "batch": 32 * args.nproc}
        extra = ["device=cuda", "train.precision=bf16", "data.tokenizer=bpe", "data.max_chars=null"]
    else:  # dim 256: where compute, not Python, dominates a step on this CPU
        size = {"num_layers": 4, "dim": 256, "num_heads": 4, "seq_len": 64, "vocab": 1000, "batch": 32}
        extra = []
    train_args = [
        "+preset=standard_llm", f"model.num_layers={size['num_layers']}", f"model.dim={size['dim']}",
        f"model.num_heads={size['num_heads']}", f"data.seq_len={size['seq_len']}", f"data.vocab_size={size['vocab']}",
        f"train.batch_size={size['batch']}", f"train.max_steps={args.steps}", f"train.eval_every={args.steps // 4}",
        "train.eval_batches=4", "train.patience=100", "save_checkpoint=false", *extra,
    ]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.gpu:
            configs = [(1, 4), (args.nproc, 4)]
        else:
            configs = [(1, 2), (args.nproc, 1)]  # the 2 cores: one process with both, or one core per process
        for i, (nproc, threads) in enumerate(configs):
            rows.append(run(nproc, threads, train_args, Path(tmp) / str(i)))
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base
        if args.gpu:
            fpt = flops_per_token(
                row["num_parameters"], size["num_layers"], size["dim"], size["seq_len"], size["vocab"]
            )
            row["mfu"] = row["tokens_per_s"] * fpt / (PEAK_BF16[args.gpu_name] * row["nproc"])
    result = {"device": "gpu" if args.gpu else "cpu", "size": size, "steps": args.steps, "rows": rows}
    name = "distributed_gpu" if args.gpu else "distributed"
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Data-parallel throughput ({result['device']})",
        "",
        f"`python benchmarks/distributed.py{' --gpu' if args.gpu else ''}`: standard LM, {size['num_layers']} layers, "
        f"dim {size['dim']}, seq {size['seq_len']}, global batch {size['batch']}, {args.steps} steps.",
        "",
        "| processes | threads each | tokens/s | speedup | val ppl |" + (" MFU |" if args.gpu else ""),
        "|---|---|---|---|---|" + ("---|" if args.gpu else ""),
    ]
    for row in rows:
        cells = [
            row["nproc"],
            row["threads"],
            f"{row['tokens_per_s']:.0f}",
            f"{row['speedup']:.2f}",
            f"{row['val_ppl']:.2f}",
        ]
        line = "| " + " | ".join(str(c) for c in cells) + " |"
        lines.append(line + (f" {100 * row['mfu']:.1f}% |" if args.gpu else ""))
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
