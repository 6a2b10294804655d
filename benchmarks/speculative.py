"""Self-speculative decoding at a width where compute matters: acceptance, speedup, and exactness.

    python benchmarks/speculative.py           # trains the model (~3-5 min on 2 cores), then decodes
    python benchmarks/speculative.py --quick   # dim 128, fewer prompts: a smoke run
    python benchmarks/speculative.py --batch 8 --run-dir /tmp/spec512 --old HEAD~1   # batch 8, reusing a trained
        # model (trained into --run-dir on first use), the decoder of git revision HEAD~1 timed alongside

A native model (dim 512, 6 layers, 8 heads, vocabulary 2000) is trained briefly on WikiText-2 with deep
supervision (`+preset=deep_supervision`: every layer's exit learns the next token, so the early layers can draft)
through `train.py`, 6 epochs over the seeds' 200K characters (every epoch kept: patience 6). Then, on prompts of 8
words from the validation text, one thread, batch 1, 64 greedy tokens each:

- full depth: the reference decoder with routing off (the same backbone layers and caches, one token at a time);
- speculative: `SelfSpeculativeDecoder` with draft exit E and k drafted tokens per round, for a few (E, k).

With `--batch B` (B > 1), B prompts decode together, each cut to the shortest of its batch (the full-depth
baseline needs equal lengths; the speculative rows still keep their own lengths as they accept differently);
results then go to speculative_bB.json/.md only. With `--old REV`, `SelfSpeculativeDecoder` as of git revision
REV runs on the same batches, interleaved with the current one (the model code is the current one for both).

Reported per setting: whether every prompt's tokens equal full depth (`exact_match`), the acceptance rate, tokens
per round, tokens/s of both, the speedup, the speedup the acceptance and layer counts predict
(`SpeculativeStats.predicted_speedup`: a round costs k draft steps of E/L of a full step plus one verify pass of
(L-E)/L, as at batch 1 where reading the weights dominates), and measured / predicted. Written to
benchmarks/speculative.json and .md, and the headline keys into benchmarks/results.json (`speculative.*`).
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from ease.checkpoint import load_checkpoint  # noqa: E402
from ease.data.tokenizers import tokenizer_from_dict  # noqa: E402
from ease.inference.generation import SamplingConfig, decode, intra_op_threads  # noqa: E402
from ease.inference.speculative import SelfSpeculativeDecoder  # noqa: E402

OUT = REPO / "benchmarks"


def train(run_dir: Path, dim: int, layers: int, heads: int, epochs: int, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Train through `train.py` (deep supervision) into run_dir; `extra`: more Hydra overrides."""
    args = [
        sys.executable, str(REPO / "train.py"), "+preset=deep_supervision", f"model.dim={dim}",
        f"model.num_layers={layers}", f"model.num_heads={heads}", "data.vocab_size=2000",
        f"train.max_epochs={epochs}", f"train.patience={epochs}",
        "progress=false", "threads=2", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    record = json.loads((run_dir / "metrics.json").read_text())
    per_exit = record["metrics"].get("per_exit", {})
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "val_ppl": record["metrics"]["ppl"],
        "per_exit_ppl": {k: round(v["ppl"], 2) for k, v in per_exit.items()},
    }


def prompts(tokenizer: Any, count: int, words: int = 8) -> list[torch.Tensor]:
    """`count` prompts of `words` validation words each, from evenly spaced places in the text."""
    text = (Path(REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens")).read_text(encoding="utf-8")
    tokens = text.split()
    step = len(tokens) // (count + 1)
    return [
        torch.tensor([tokenizer.encode(" ".join(tokens[i * step : i * step + words]))]) for i in range(1, count + 1)
    ]


def batched(prompts: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Groups of `size` prompts as (size, T) ids, each cut to the shortest of its group (the last may be smaller)."""
    groups = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    return [torch.cat([p[:, : min(q.shape[1] for q in g)] for p in g]) for g in groups]


def old_decoder(rev: str) -> type:
    """`SelfSpeculativeDecoder` as of git revision `rev`, loaded beside the current one."""
    source = subprocess.run(
        ["git", "show", f"{rev}:ease/inference/speculative.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="ease-spec-old-")) / "speculative_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("speculative_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SelfSpeculativeDecoder


def measure(
    model: Any, batch: list[torch.Tensor], draft_exit: int, k: int, n: int, old: type | None = None
) -> dict[str, Any]:
    """Every prompt (batch of prompts) decoded by full depth and by speculation (and by `old`), alternately; times
    summed over prompts."""
    full_s = spec_s = old_s = 0.0
    exact, old_exact, accepted, drafted, rounds, emitted, cost = True, True, 0, 0, 0, 0, 0.0
    for prompt in batch:
        B = prompt.shape[0]
        sampling = SamplingConfig(n, 0.0, None, B, "propagate", "reference")
        full = decode(model, prompt, sampling, None, None, 0.0, threads=1)
        with intra_op_threads(1):
            tokens, st = SelfSpeculativeDecoder(model, draft_exit, k).generate(prompt, n)
            if old is not None:
                old_tokens, old_st = old(model, draft_exit, k).generate(prompt, n)
                old_s += old_st.seconds
                old_exact &= bool(torch.equal(old_tokens, full.tokens))
        full_s, spec_s = full_s + full.seconds, spec_s + st.seconds
        exact &= bool(torch.equal(tokens, full.tokens))
        accepted, drafted, rounds = accepted + st.accepted, drafted + st.drafted, rounds + st.rounds
        emitted += st.emitted
        cost += st.emitted / st.predicted_speedup(model.num_layers, draft_exit, B)  # in full-depth token steps
    speedup = full_s / spec_s
    predicted = emitted / cost
    row = {
        "draft_exit": draft_exit, "k": k, "prompts": sum(p.shape[0] for p in batch), "batch": batch[0].shape[0],
        "tokens_each": n, "exact_match": exact,
        "acceptance": round(accepted / drafted, 4), "tokens_per_round": round(emitted / batch[0].shape[0] / rounds, 2),
        "full_tokens_per_s": round(emitted / full_s, 1), "spec_tokens_per_s": round(emitted / spec_s, 1),
        "speedup": round(speedup, 3), "predicted_speedup": round(predicted, 3),
        "speedup_over_predicted": round(speedup / predicted, 3),
    }  # fmt: skip
    if old is not None:
        row.update({"old_tokens_per_s": round(emitted / old_s, 1), "new_over_old": round(old_s / spec_s, 3),
                    "old_exact_match": old_exact})  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--prompts", type=int, default=None, help="prompts in all (default 20, --quick 5)")
    parser.add_argument("--run-dir", type=Path, default=None, help="train here once and reuse the model after")
    parser.add_argument("--old", default=None, help="git revision whose decoder is timed alongside")
    args = parser.parse_args()
    dim, layers, heads, count, n, epochs = (128, 4, 4, 5, 32, 1) if args.quick else (512, 6, 8, 20, 64, 6)
    count = args.prompts or count
    settings = [(1, 4), (2, 4), (2, 6), (3, 4)] if not args.quick else [(1, 4), (2, 4)]
    with tempfile.TemporaryDirectory(prefix="ease-bench-spec-") as tmp:
        run_dir = args.run_dir or Path(tmp) / "run"
        if (run_dir / "checkpoint.pt").is_file():
            trained = {"reused": str(run_dir)}
        else:
            trained = train(run_dir, dim, layers, heads, epochs)
        model, ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    model.eval()
    tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    batch = batched(prompts(tokenizer, count), args.batch)
    old = old_decoder(args.old) if args.old else None
    measure(model, batch[:2], 1, 4, 8, old)  # warm-up
    rows = [measure(model, batch, e, k, n, old) for e, k in settings]
    best = max(rows, key=lambda r: r["speedup"])
    result = {
        "setting": f"dim {dim}, {layers} layers, {heads} heads, vocab 2000, deep supervision, 1 epoch of WikiText-2 "
        f"(200K chars); greedy, batch {args.batch}, one thread, {n} tokens after an 8-word prompt, {count} prompts",
        "machine": machine(),
        "load_average_end": os.getloadavg(),
        "training": trained,
        "rows": rows,
        "exact_match": all(r["exact_match"] for r in rows),
        "best": best,
    }
    name = "speculative_quick" if args.quick else "speculative"
    if args.batch > 1:
        name += f"_b{args.batch}"
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = tabulate(rows, headers="keys", tablefmt="github")
    (OUT / f"{name}.md").write_text(
        f"# Self-speculative decoding\n\n`python benchmarks/speculative.py{' --quick' if args.quick else ''}`: "
        f"{result['setting']}.\n\nTraining: {trained}\n\n{table}\n"
    )
    print(table)
    if not args.quick and args.batch == 1:  # the headline keys the issue asks for, beside the other benchmarks' results
        path = OUT / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else {}
        results["speculative"] = {
            "exact_match": result["exact_match"],
            "speedup_b1": best["speedup"],
            "acceptance": best["acceptance"],
            "draft_exit": best["draft_exit"],
            "k": best["k"],
            "speedup_over_predicted": best["speedup_over_predicted"],
            "median_speedup": statistics.median(r["speedup"] for r in rows),
            "dim": dim,
        }
        path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
